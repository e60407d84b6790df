"""Run tinker-cookbook's loop recipes against tinkerd's built-in model, offline.

    python -m tests.e2e.cookbook_driver sl|rl --data FILE.jsonl [recipe config key=value ...]

The recipes themselves (`tinker_cookbook.recipes.sl_loop` / `rl_loop`, cookbook 0.6.1)
run unmodified; this driver only supplies what they would otherwise fetch from a hub or
look up in tables that don't know tinkerd's model:

- data: both recipes call `datasets.load_dataset(<hub data set>)` (No Robots, GSM8K);
  here it returns the rows of `--data`, a local JSONL file with the same columns
  (`messages` for sl; `question`, `answer` for rl).
- renderer: both recipes ask `model_info.get_recommended_renderer_name(model_name)`,
  which knows only the hosted models; `tinkerd/tiny-qwen3` gets `qwen3_instruct`, whose
  `<|im_start|>role\\n…<|im_end|>` format is the built-in model's chat template.
- rl reward: the recipe's GSM8K reward is 1 only for a correct `\\boxed{}` answer, which
  a random tiny model never writes, so every group's advantages would be 0 and no
  training step would run. With `--shaped-reward` the reward is the recipe's own plus
  the share of digits and spaces in the response, which varies within a group.

- sessions: the recipes never close their ServiceClient, so their sessions (and the
  server's adapter slots) would live on until the heartbeat timeout; the driver closes
  every ServiceClient the recipe made once it returns or fails.

The tokenizer is the real lookup (`get_tokenizer("tinkerd/tiny-qwen3")` →
`AutoTokenizer.from_pretrained`), served offline from the HF cache that
`python -m actors.builtin_model DIR --hf-home HF_HOME` writes: run with `HF_HOME` set
to it and `HF_HUB_OFFLINE=1`. The server comes from `base_url=…` (or
`TINKER_BASE_URL`), the key from `TINKER_API_KEY`.
"""

from __future__ import annotations

import argparse
import json
import sys

BUILTIN_MODEL = "tinkerd/tiny-qwen3"
BUILTIN_RENDERER = "qwen3_instruct"


def register_builtin_model() -> None:
    """Teach cookbook's model table the built-in model (it raises ConfigurationError otherwise)."""
    from tinker_cookbook import model_info

    original = model_info.get_model_attributes
    attributes = model_info.ModelAttributes(
        organization="tinkerd", version_str="3", size_str="3.4M", is_chat=True,
        recommended_renderers=(BUILTIN_RENDERER,),
    )

    def get_model_attributes(model_name: str):
        if model_name.split(":", 1)[0] == BUILTIN_MODEL:
            return attributes
        return original(model_name)

    model_info.get_model_attributes = get_model_attributes


def serve_local_dataset(path: str) -> None:
    """Make `datasets.load_dataset(...)` return the JSONL rows at `path` as a "train" split."""
    import datasets

    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]

    def load_dataset(*args, **kwargs):
        print(f"cookbook_driver: load_dataset{args} -> {len(rows)} local rows from {path}", flush=True)
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})

    datasets.load_dataset = load_dataset


def shape_rl_reward(recipe) -> None:
    original = recipe.get_reward

    def get_reward(response: str, answer: str) -> float:
        exact = original(response, answer)
        shaped = sum(ch.isdigit() or ch.isspace() for ch in response) / max(1, len(response))
        return exact + shaped

    recipe.get_reward = get_reward


def close_sessions_afterwards(run) -> None:
    """Run `run()`, then finish the session of every tinker.ServiceClient made meanwhile."""
    import tinker

    clients = []
    original_init = tinker.ServiceClient.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        clients.append(self)

    tinker.ServiceClient.__init__ = init
    status = "errored"
    try:
        run()
        status = "success"
    finally:
        tinker.ServiceClient.__init__ = original_init
        for client in clients:
            try:
                client.close(status).result(timeout=30)
            except Exception as e:  # the recipe's own error, if any, is the one to see
                print(f"cookbook_driver: closing a session failed: {e!r}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", choices=["sl", "rl"])
    parser.add_argument("--data", required=True, help="local JSONL with the recipe's data set columns")
    parser.add_argument("--shaped-reward", action="store_true",
                        help="rl: add the share of digits and spaces to the reward")
    args, overrides = parser.parse_known_args(argv)

    import chz

    if args.recipe == "sl":
        from tinker_cookbook.recipes import sl_loop as recipe
    else:
        from tinker_cookbook.recipes import rl_loop as recipe
    register_builtin_model()
    serve_local_dataset(args.data)
    if args.recipe == "rl" and args.shaped_reward:
        shape_rl_reward(recipe)
    config = chz.Blueprint(recipe.Config).apply({"model_name": BUILTIN_MODEL}).make_from_argv(overrides)
    close_sessions_afterwards(lambda: recipe.main(config))


if __name__ == "__main__":
    main(sys.argv[1:])
