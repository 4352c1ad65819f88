"""The `mmllm` command line (library side): the table of commands, the parser built from it, and `main`. Each command
is one module of this package (its arguments and its `run`); user mistakes end with one clear line and exit code 1.
"""

import argparse
import logging
import sys

from . import build, chat, convert, demo, evaluate, generate, push, quickstart, serve, train, upgrade
from .common import USER_ERRORS

# The commands in the order `mmllm --help` lists them. Each module has NAME, HELP, DESCRIPTION (None: argparse's
# default), add_arguments(parser) and run(args).
COMMANDS = (quickstart, train, build, chat, generate, serve, demo, evaluate, convert, upgrade, push)

# accelerate imports DeepSpeed (the train extra) whenever a model is saved or trained, and DeepSpeed then warns that
# it found no GPU on every CPU command. Only that notice is dropped (DeepSpeed's logger keeps the rest).
_DEEPSPEED_CPU_NOTICE = "Setting accelerator to CPU"


def _not_deepspeed_cpu_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_DEEPSPEED_CPU_NOTICE)


def quiet_third_party_logs() -> None:
    """Silence the notices that are not the user's (called by `main`, not at import; calling it again is harmless).

    transformers imports torchao whenever it is installed (the serve extra): torchao then logs the CUDA kernels a CPU
    cannot load and torch logs torchao's use of a deprecated pytree call, on every command."""
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logging.getLogger("DeepSpeed").addFilter(_not_deepspeed_cpu_notice)  # added once: the same function


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="mmllm", description="Multimodal LLMs as Hub-native transformers models.")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        command = commands.add_parser(module.NAME, help=module.HELP, description=module.DESCRIPTION)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet_third_party_logs()
    try:
        args.run(args)
    except USER_ERRORS as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"mmllm {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mmllm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
