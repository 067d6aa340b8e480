"""FLUX LoRA adapters: configured by the operator, loaded at start-up, chosen per request.

The operator names adapters (`LORA_DIR`: every `*.safetensors` file, named by its stem;
`LORAS`: `name=org/repo[:weight_name]` from the hub); requests can only pick among those names.
Two ways to switch them, by COMPILE:

- **Eager** (`COMPILE=off`): every adapter stays loaded under its own name (diffusers'
  `load_lora_weights(adapter_name=...)`); a request's set is `set_adapters(names, scales)`, and
  a request without one runs with `disable_lora()`, which is the base model exactly.
- **Compiled** (`COMPILE=regional` or `full`): changing which adapters are active changes the
  graph, and would recompile. So the transformer gets `MAX_LORAS_PER_REQUEST` fixed slots,
  prepared with diffusers' `enable_lora_hotswap` and loaded before it is compiled, and a
  request's adapters are hot-swapped into them by copying weights in place: only values change.
  Each adapter's weights are kept on the CPU in one canonical form (every layer any adapter
  touches, the largest rank, its alpha / r folded into `lora_B`, to which the request's scale
  is applied), and an unused slot holds zeros, whose contribution is exactly zero.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hunyuan_service.errors import ModelLoadError

if TYPE_CHECKING:
    from hunyuan_service.settings import Settings

logger = logging.getLogger(__name__)

Selection = tuple[tuple[str, float], ...]  # (name, scale) pairs, sorted by name


@dataclass(frozen=True)
class AdapterSource:
    """Where one configured adapter comes from: a local file, or a hub repository."""

    name: str
    location: str  # a file path, or a hub repository id
    weight_name: str | None = None  # the file inside the hub repository

    @property
    def is_file(self) -> bool:
        return self.weight_name is None and self.location.endswith(".safetensors")

    def describe(self) -> str:
        if self.is_file:
            return self.location
        return f"{self.location}:{self.weight_name}" if self.weight_name else self.location


def configured_adapters(settings: Settings) -> list[AdapterSource]:
    """The adapters LORA_DIR and LORAS name, in that order; a name used twice is refused."""
    sources: list[AdapterSource] = []
    if settings.lora_dir is not None:
        for path in sorted(settings.lora_dir.glob("*.safetensors")):
            sources.append(AdapterSource(path.stem, str(path)))
    for entry in settings.loras:
        name, _, where = entry.partition("=")
        repo, _, weight_name = where.partition(":")
        sources.append(AdapterSource(name, repo, weight_name or None))
    seen: set[str] = set()
    for source in sources:
        if source.name in seen:
            raise ModelLoadError(
                f"LoRA name {source.name!r} is configured twice (LORA_DIR file stems and LORAS "
                "names must all differ)"
            )
        seen.add(source.name)
    return sources


def download_adapters(settings: Settings) -> list[tuple[str, str]]:
    """Fetches the hub adapters of LORAS into the HF cache (for `hunyuan-service download`);
    returns each one's name and local path."""
    from huggingface_hub import hf_hub_download, snapshot_download

    fetched = []
    for source in configured_adapters(settings):
        if source.is_file:
            continue
        if source.weight_name:
            path = hf_hub_download(source.location, source.weight_name)
        else:
            path = snapshot_download(source.location, allow_patterns=["*.safetensors"])
        fetched.append((source.name, str(path)))
    return fetched


def canonical(loras: Any) -> Selection:
    """A request's adapters as sorted (name, scale) pairs: equal sets compare and batch equal."""
    return tuple(sorted((str(name), float(scale)) for name, scale in loras))


class Adapters:
    """The adapters loaded into one FLUX pipeline, and which of them are active now."""

    def __init__(self, pipe: Any, sources: list[AdapterSource], slots: int, hotswap: bool) -> None:
        self.pipe = pipe
        self.sources = {source.name: source for source in sources}
        self.slots = slots
        self.hotswap = hotswap
        self.ranks: dict[str, int] = {}
        self.text_encoder: dict[str, bool] = {}
        self.canonical: dict[str, dict[str, Any]] = {}  # hot-swap: each adapter's weights
        self.zeros: dict[str, Any] = {}  # hot-swap: an empty slot
        self.targets: list[dict[str, Any]] = []  # hot-swap: each slot's parameters, by key
        self.active: Selection = ()

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "name": name,
                "source": source.describe(),
                "rank": self.ranks.get(name),
                "text_encoder": self.text_encoder.get(name, False),
            }
            for name, source in self.sources.items()
        ]

    # -- start-up ----------------------------------------------------------------------------

    def load(self) -> None:
        """Reads and loads every adapter; a file that is not a FLUX LoRA stops start-up with
        one line naming it."""
        if not self.sources:
            return  # nothing to load, and no reason to import peft
        with _quiet():
            self._load()
        logger.info(
            "LoRA adapters ready: %s (%s)",
            ", ".join(self.sources) or "none",
            "hot-swapped into fixed slots" if self.hotswap else "switched by set_adapters",
        )

    def _load(self) -> None:
        weights = {name: self._read(source) for name, source in self.sources.items()}
        if self.hotswap:
            self._prepare_slots(weights)
        else:
            for name in weights:
                self._guard(name, lambda n=name: self._load_named(n))
            self.pipe.disable_lora()

    def _read(self, source: AdapterSource) -> tuple[dict[str, Any], dict[str, float]]:
        """The adapter's weights in diffusers' layout and, when hot-swapping, each layer's
        scaling (alpha / r)."""

        def read() -> tuple[dict[str, Any], dict[str, Any], Any]:
            state, alphas, metadata = self.pipe.lora_state_dict(
                source.location,
                weight_name=source.weight_name,
                return_alphas=True,
                return_lora_metadata=True,
            )
            return dict(state), dict(alphas or {}), metadata

        state, alphas, metadata = self._guard(source.name, read)
        if any("lora" not in k for k in state):
            raise ModelLoadError(
                f"LoRA {source.name!r} ({source.describe()}): it changes base weights (a Control "
                "LoRA or a full fine-tune); only LoRA layers can be switched per request"
            )
        transformer_keys = [k for k in state if k.startswith("transformer.") and "lora" in k]
        others = [k for k in state if not k.startswith(("transformer.", "text_encoder."))]
        if not transformer_keys or others:
            problem = f"unexpected keys such as {others[0]}" if others else "no transformer layers"
            raise ModelLoadError(
                f"LoRA {source.name!r} ({source.describe()}): not a FLUX LoRA ({problem})"
            )
        ranks = [int(t.shape[0]) for k, t in state.items() if "lora_A" in k]
        self.ranks[source.name] = max(ranks, default=0)
        self.text_encoder[source.name] = any(k.startswith("text_encoder.") for k in state)
        if self.hotswap and self.text_encoder[source.name]:
            raise ModelLoadError(
                f"LoRA {source.name!r} has text-encoder weights, which can't be hot-swapped into "
                "a compiled model; use COMPILE=off for it"
            )
        if not self.hotswap:
            return state, {}
        scalings = self._guard(source.name, lambda: _layer_scalings(state, alphas, metadata))
        return state, scalings

    def _load_named(self, name: str) -> None:
        source = self.sources[name]
        before = self.pipe.transformer.x_embedder.weight.shape
        self.pipe.load_lora_weights(
            source.location, weight_name=source.weight_name, adapter_name=name
        )
        if self.pipe.transformer.x_embedder.weight.shape != before:
            raise ModelLoadError(f"LoRA {name!r} changes the transformer's input layer")

    def _guard(self, name: str, step: Any) -> Any:
        try:
            return step()
        except ModelLoadError:
            raise
        except Exception as error:
            source = self.sources[name].describe()
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
            raise ModelLoadError(f"LoRA {name!r} ({source}): {first}") from None

    def _prepare_slots(self, weights: dict[str, tuple[dict[str, Any], dict[str, Any]]]) -> None:
        """Hot-swap mode: the canonical weights of each adapter, and zero-filled slots."""
        import torch

        shapes: dict[str, tuple[int, int]] = {}  # layer -> (in_features, out_features)
        for state, _ in weights.values():
            for key, tensor in state.items():
                layer, part = _layer_and_part(key)
                if part == "lora_A":
                    shapes.setdefault(layer, (0, 0))
                    shapes[layer] = (int(tensor.shape[1]), shapes[layer][1])
                elif part == "lora_B":
                    shapes.setdefault(layer, (0, 0))
                    shapes[layer] = (shapes[layer][0], int(tensor.shape[0]))
        rank = max(self.ranks.values(), default=1)
        for name, (state, scalings) in weights.items():
            self.canonical[name] = _canonical_weights(state, scalings, shapes, rank)
        zeros = {
            key: torch.zeros_like(value)
            for key, value in next(iter(self.canonical.values()), {}).items()
        }
        self.zeros = zeros
        if not zeros:  # no adapters configured: nothing to prepare
            return
        self.pipe.enable_lora_hotswap(target_rank=rank)
        for slot in range(self.slots):
            # Fresh tensors per slot: a loaded slot may keep the very tensors it was given.
            empty = {key: value.clone() for key, value in zeros.items()}
            self.pipe.load_lora_weights(empty, adapter_name=_slot(slot))
        self.pipe.set_adapters([_slot(i) for i in range(self.slots)], [1.0] * self.slots)

    # -- per request -------------------------------------------------------------------------

    def apply(self, selection: Selection) -> None:
        """Makes exactly `selection` active (an empty one: the base model)."""
        if selection == self.active:
            return
        if self.hotswap:
            self._swap(selection)
        elif not selection:
            self.pipe.disable_lora()
        else:
            self.pipe.enable_lora()
            self.pipe.set_adapters([n for n, _ in selection], [s for _, s in selection])
        self.active = selection

    def _swap(self, selection: Selection) -> None:
        """Writes each changed slot's weights in place: the compiled graph reads the same
        parameters, now holding other values.

        diffusers' `load_lora_weights(..., hotswap=True)` does the same copy but first re-reads
        and re-checks the whole state dict: 288 ms per swap on a 6-block FLUX of real width on
        an H100 (docs/loras.md). The slots it prepared are written directly instead.
        """
        import torch

        targets = self._slot_parameters()
        previous = dict(enumerate(self.active))
        with torch.no_grad():
            for slot in range(self.slots):
                wanted = selection[slot] if slot < len(selection) else None
                if previous.get(slot) == wanted:
                    continue
                for key, parameter in targets[slot].items():
                    if wanted is None:
                        parameter.zero_()
                        continue
                    name, scale = wanted
                    parameter.copy_(self.canonical[name][key], non_blocking=True)
                    if ".lora_B." in key and scale != 1.0:
                        parameter.mul_(scale)

    def _slot_parameters(self) -> list[dict[str, Any]]:
        """For each slot, the transformer's parameter behind each canonical key (found once,
        after the pipeline has moved to its device; the weights kept on the CPU are pinned
        there, so copies to a GPU overlap)."""
        if self.targets:
            return self.targets
        named = dict(self.pipe.transformer.named_parameters())
        for slot in range(self.slots):
            found = {}
            for key in self.zeros:
                layer, part = _layer_and_part(key)
                name = f"{layer.removeprefix('transformer.')}.{part}.{_slot(slot)}.weight"
                found[key] = named[name]
            self.targets.append(found)
        device = next(iter(self.targets[0].values())).device
        dtype = next(iter(self.targets[0].values())).dtype
        for weights in self.canonical.values():
            for key, value in weights.items():
                value = value.to(dtype)
                weights[key] = value.pin_memory() if device.type == "cuda" else value
        return self.targets


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Mutes what diffusers and peft say on every LoRA load: that the text encoder got no
    weights, and that a model holds several adapters. Both are expected here."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            yield
    finally:
        diffusers_logging.set_verbosity(level)


def _slot(index: int) -> str:
    return f"slot{index}"


def _layer_and_part(key: str) -> tuple[str, str]:
    """`transformer.a.b.lora_A.weight` -> (`transformer.a.b`, `lora_A`)."""
    for part in ("lora_A", "lora_B"):
        marker = f".{part}."
        if marker in key:
            return key.split(marker)[0], part
    return key, ""


def _layer_scalings(
    state: dict[str, Any], alphas: dict[str, Any], metadata: Any
) -> dict[str, float]:
    """Each layer's LoRA scaling, alpha / r: alpha from `<layer>.alpha` entries (kohya-style
    files), else from the file's PEFT metadata (`lora_alpha`, `alpha_pattern`, `use_rslora`); a
    layer with neither has alpha = r, as diffusers assumes."""
    meta = {
        key.removeprefix("transformer."): value
        for key, value in (metadata or {}).items()
        if key.startswith("transformer.")
    }
    if meta.get("use_dora"):
        raise ValueError("DoRA adapters can't be hot-swapped; use COMPILE=off")
    pattern = meta.get("alpha_pattern") or {}
    scalings: dict[str, float] = {}
    for key, tensor in state.items():
        layer, part = _layer_and_part(key)
        if part != "lora_A" or not layer.startswith("transformer."):
            continue
        rank = int(tensor.shape[0])
        name = layer.removeprefix("transformer.")
        alpha = alphas.get(f"{layer}.alpha")
        if alpha is None and "lora_alpha" in meta:
            matched = [v for k, v in pattern.items() if name == k or name.endswith("." + k)]
            alpha = matched[0] if matched else meta["lora_alpha"]
        alpha = float(alpha) if alpha is not None else float(rank)
        scalings[layer] = alpha / (rank**0.5 if meta.get("use_rslora") else rank)
    return scalings


def _canonical_weights(
    state: dict[str, Any], scalings: dict[str, float], shapes: dict[str, tuple[int, int]], rank: int
) -> dict[str, Any]:
    """Every layer in `shapes` at `rank`, with the layer's scaling folded into lora_B, so that a
    slot's own scaling is 1 and a layer this adapter leaves alone is zero."""
    import torch

    out: dict[str, Any] = {}
    for layer, (fan_in, fan_out) in shapes.items():
        a = state.get(f"{layer}.lora_A.weight")
        b = state.get(f"{layer}.lora_B.weight")
        full_a = torch.zeros(rank, fan_in, dtype=torch.float32)
        full_b = torch.zeros(fan_out, rank, dtype=torch.float32)
        if a is not None and b is not None:
            r = int(a.shape[0])
            full_a[:r] = a.float()
            full_b[:, :r] = b.float() * scalings.get(layer, 1.0)
        dtype = a.dtype if a is not None else torch.float32
        out[f"{layer}.lora_A.weight"] = full_a.to(dtype)
        out[f"{layer}.lora_B.weight"] = full_b.to(dtype)
    return out
