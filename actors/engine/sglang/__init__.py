"""The SGLang engine backend (runs from SGLang's own virtualenv: launch/sglang_env.py)."""
