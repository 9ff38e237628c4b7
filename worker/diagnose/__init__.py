"""The start-up diagnostic (`python test_vllm_command.py`): the report and its steps
(report) and the checks made before anything starts (preflight)."""
