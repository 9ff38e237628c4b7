"""The vLLM children: where one listens (target), its life from spawn to stop
(supervisor), and its start-up phases read from its log (timeline)."""
