"""How each vLLM will start, decided before anything is spawned: the plan (plan), the
command line (command), the parsers (parser_choice), the static LoRA adapters (adapters),
what the model's files say (model_facts), where the compile cache goes (compile_cache)."""
