"""The servers and the process's life: the serve context (context), the load-balancing
server (load_balancer), the local endpoint's Runpod API (local_api) and its job table
(job_table), and the limits every HTTP server keeps (http_limits)."""
