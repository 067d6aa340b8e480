"""Log set-up: one line per event, with structured `key=value` fields such as the request id."""

from __future__ import annotations

import logging

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class KeyValueFormatter(logging.Formatter):
    """Appends the `extra={...}` fields of a record as `key=value` pairs."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        fields.pop("color_message", None)
        if not fields:
            return line
        pairs = " ".join(f"{key}={value}" for key, value in fields.items())
        head, sep, tail = line.partition("\n")
        return f"{head} {pairs}{sep}{tail}"


# Lines that libraries print at every start although nobody can act on them, by logger and by
# how the message begins. Each is a harmless mismatch between locked versions, which the start-up
# test (tests/e2e/test_startup_output.py) would show again once the versions move on.
KNOWN_NOISE: dict[str, tuple[str, ...]] = {
    # torchao 0.18 registers two of its Enums as pytree constants at import, which torch 2.15
    # deprecates; transformers and diffusers import torchao whenever it is installed.
    "torch.utils._pytree": ("%s is an Enum subclass and is now natively supported",),
    # diffusers 0.42 looks for torchao tensor classes that torchao 0.18 no longer has; they
    # matter only for loading torchao-serialized checkpoints, which the service never does
    # (QUANTIZE quantizes at load).
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor",),
}


class DropKnownNoise(logging.Filter):
    def __init__(self, beginnings: tuple[str, ...]) -> None:
        super().__init__()
        self.beginnings = beginnings

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.beginnings)


def configure_logging(level: str) -> None:
    """One handler on stderr; uvicorn's lines go through it, and only its warnings unless
    LOG_LEVEL=debug (the service logs where it listens, drains and stops itself)."""
    handler = logging.StreamHandler()
    handler.setFormatter(KeyValueFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    if level != "debug":
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    for name, beginnings in KNOWN_NOISE.items():
        logging.getLogger(name).addFilter(DropKnownNoise(beginnings))
