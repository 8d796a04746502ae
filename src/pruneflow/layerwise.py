"""Layer-by-layer forward passes: one decoder layer on the device at a time.

A model bigger than its device still runs the forward-only work (activation statistics, Gram
matrices, sequential re-fitting, perplexity; Taylor gradients build on it in `importance.taylor`)
the way SparseGPT, FLAP and llm-compressor calibrate:
the batches are embedded once, then each decoder layer in turn is brought to the device, runs every
batch's hidden states, and hands its outputs on to the next layer. Peak device memory is one layer,
the modules outside the layers (embeddings, final norm, head) and the batches' hidden states,
whatever the depth.

Layer weights come from a `LayerWeights` source: `ResidentWeights` (the model sits in host memory;
a layer is copied to the device and back) or `CheckpointWeights` (the model is a skeleton on the
meta device; each layer's tensors are read from the folder's safetensors files when it runs and
dropped after, so host memory holds one layer too).

Written here rather than taken from accelerate: its offload hooks (`cpu_offload`, a `device_map`
with offload) copy a module's weights to the device on every forward call, i.e. every layer once
per batch, and run each batch through all layers, not each layer through all batches as sequential
re-fitting needs. The keyword arguments each layer gets (attention mask, rotary table; Gemma's local
and global layers get different ones) come from the model's own forward pass run with every layer
replaced by a pass-through, so each family's mask and rotary code is used as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pruneflow.architectures import decoder_layers
from pruneflow.errors import ModelError

log = logging.getLogger(__name__)
EXECUTIONS = ("auto", "whole_model", "layer_by_layer")
# factor on the estimated bytes: a layer's internal activations, the head's logits, allocator slack
HEADROOM = 1.25


class _StopForward(Exception):
    pass


class _PassThrough(nn.Module):
    """Stands in for a decoder layer inside the model's forward pass: records what the layer would get
    (and returns its input, or a stored output when replaying the last layer)."""

    def __init__(self, index: int, on_call: Callable[[int, torch.Tensor, dict], torch.Tensor | None]):
        super().__init__()
        self.index = index
        self.on_call = on_call

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args:
            raise ModelError(f"decoder layer {self.index} was called with {len(args)} positional arguments after "
                             "the hidden states; layer-by-layer execution supports keyword arguments only")
        replaced = self.on_call(self.index, hidden_states, kwargs)
        return hidden_states if replaced is None else replaced


@contextlib.contextmanager
def _layers_replaced(model: nn.Module, on_call) -> Iterator[None]:
    blocks = decoder_layers(model)
    originals = list(blocks)
    for index in range(len(blocks)):
        blocks[index] = _PassThrough(index, on_call)
    try:
        yield
    finally:
        for index, layer in enumerate(originals):
            blocks[index] = layer


def outside_layers_to(model: nn.Module, device: torch.device | str) -> None:
    """Move every module but the decoder layers (embeddings, rotary tables, final norm, head) to `device`."""
    with _layers_replaced(model, lambda *_: None), _ordinary_tensors():
        model.to(device)


def _ordinary_tensors() -> contextlib.AbstractContextManager:
    """Weights moved or read while a caller runs under `torch.inference_mode` (perplexity, activation
    statistics) must stay ordinary tensors: a later gradient pass (Taylor) sets requires_grad on them."""
    return torch.inference_mode(False)


# ------------------------------------------------------------------------------------------ weights


class LayerWeights:
    """Brings decoder layer `index` onto the device before it runs and takes it away afterwards."""

    def load(self, index: int, layer: nn.Module, device: torch.device) -> None:
        raise NotImplementedError

    def unload(self, index: int, layer: nn.Module) -> None:
        raise NotImplementedError


class InPlace(LayerWeights):
    """The layers are where they run already (a whole-model pass): nothing moves."""

    def load(self, index: int, layer: nn.Module, device: torch.device) -> None:
        pass

    def unload(self, index: int, layer: nn.Module) -> None:
        pass


@dataclass
class ResidentWeights(LayerWeights):
    """The whole model lives in host memory (`home`); a layer visits the device while it runs."""

    home: torch.device | str = "cpu"

    def load(self, index: int, layer: nn.Module, device: torch.device) -> None:
        with _ordinary_tensors():
            layer.to(device)

    def unload(self, index: int, layer: nn.Module) -> None:
        with _ordinary_tensors():
            layer.to(self.home)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _safetensors_index(path: Path) -> dict[str, tuple[str, list[int], int, int]]:
    """name -> (dtype, shape, start, end) of a safetensors file (absolute byte offsets)."""
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    base = 8 + header_len
    return {name: (entry["dtype"], entry["shape"], base + entry["data_offsets"][0], base + entry["data_offsets"][1])
            for name, entry in header.items() if name != "__metadata__"}


class CheckpointWeights(LayerWeights):
    """Layers read from a folder's safetensors files when they run, then dropped back to the meta device.

    Tensors are read by byte range into fresh memory (the format is a JSON header of dtypes, shapes and
    offsets): safetensors' own `safe_open` memory-maps the file, and the pages a read touches stay
    resident in this process while the file is mapped, so reading layer after layer through it grows the
    process by every layer (measured: +220 MB per 0.18 GB fp32 layer on a CPU)."""

    def __init__(self, folder: str | Path, model: nn.Module, dtype: torch.dtype):
        self.folder = Path(folder)
        self.dtype = dtype
        index_file = self.folder / "model.safetensors.index.json"
        if index_file.is_file():
            files = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
        elif (self.folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise ModelError(f"layer-by-layer loading reads safetensors weights, but {self.folder} has neither "
                             "model.safetensors nor model.safetensors.index.json")
        self._entries: dict[str, tuple[Path, str, list[int], int, int]] = {}
        for file in files:
            try:
                entries = _safetensors_index(self.folder / file)
            except (OSError, ValueError, KeyError) as exc:
                raise ModelError(f"{self.folder / file} is not a readable safetensors file: {exc}") from exc
            for name, entry in entries.items():
                self._entries[name] = (self.folder / file, *entry)
        names = {id(module): name for name, module in model.named_modules()}
        self._prefixes = [names[id(layer)] + "." for layer in decoder_layers(model)]

    def tensor(self, key: str) -> torch.Tensor:
        if key not in self._entries:
            raise ModelError(f"{self.folder} has no tensor {key!r}, which the model's config calls for")
        path, dtype, shape, start, end = self._entries[key]
        if dtype not in _SAFETENSORS_DTYPES:
            raise ModelError(f"{path}: tensor {key!r} has dtype {dtype}; layer-by-layer loading reads "
                             f"{', '.join(_SAFETENSORS_DTYPES)}")
        data = bytearray(end - start)
        with open(path, "rb") as handle:
            handle.seek(start)
            if handle.readinto(data) != len(data):
                raise ModelError(f"{path} is truncated: tensor {key!r} ends past the end of the file")
        flat = torch.frombuffer(data, dtype=_SAFETENSORS_DTYPES[dtype]) if data else \
            torch.empty(0, dtype=_SAFETENSORS_DTYPES[dtype])
        return flat.reshape(shape)

    def has(self, key: str) -> bool:
        return key in self._entries

    def _fill(self, module: nn.Module, prefix: str, device: torch.device | str, *,
              skip: Callable[[str], bool] = lambda _name: False) -> None:
        """Read `module`'s tensors (checkpoint keys `prefix` + name) onto `device`; tensors the file lacks
        that already hold values (buffers computed at init, such as rotary tables) are moved there."""
        from accelerate.utils import set_module_tensor_to_device

        from pruneflow.architectures import FusedLinear

        fused = {name: sub for name, sub in module.named_modules() if isinstance(sub, FusedLinear)}
        for path, sub in fused.items():  # split while pruneflow works (Phi-3): the file holds the fused tensor
            self._fill_fused(sub, f"{prefix}{path}.", device)
        tensors = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers())
        for name, current in tensors:
            if skip(name) or any(name.startswith(path + ".") for path in fused):
                continue
            key = prefix + name
            if not self.has(key):
                if current.device.type == "meta":
                    raise ModelError(f"{self.folder} has no tensor {key!r}, which the model's config calls for")
                set_module_tensor_to_device(module, name, device)
                continue
            value = self.tensor(key)
            if value.shape != current.shape:
                raise ModelError(f"{self.folder}: tensor {key!r} has shape {tuple(value.shape)}, the config "
                                 f"asks for {tuple(current.shape)}")
            set_module_tensor_to_device(module, name, device, value=value,
                                        dtype=self.dtype if value.is_floating_point() else None)

    def _fill_fused(self, fused: nn.Module, prefix: str, device: torch.device | str) -> None:
        from accelerate.utils import set_module_tensor_to_device

        parts = list(fused.children())
        sizes = [part.out_features for part in parts]
        for kind in ("weight", "bias"):
            if getattr(parts[0], kind) is None:
                continue
            stored = self.tensor(prefix + kind)
            if stored.shape[0] != sum(sizes):
                raise ModelError(f"{self.folder}: tensor {prefix + kind!r} has {stored.shape[0]} rows, the layer's "
                                 f"parts {sum(sizes)}")
            for part, value in zip(parts, stored.split(sizes), strict=True):
                set_module_tensor_to_device(part, kind, device, value=value.contiguous(), dtype=self.dtype)

    def load_outside_layers(self, model: nn.Module, device: torch.device | str) -> None:
        """Read every tensor outside the decoder layers onto `device`; a tied head shares the embedding."""
        layer_prefixes = tuple(self._prefixes)
        head = model.get_output_embeddings()
        tied = bool(getattr(model.config, "tie_word_embeddings", False)) and head is not None
        head_prefix = next((name + "." for name, module in model.named_modules() if module is head), None)

        def skip(name: str) -> bool:
            return name.startswith(layer_prefixes) or (tied and head_prefix is not None
                                                       and name.startswith(head_prefix))

        self._fill(model, "", device, skip=skip)
        if tied:
            head.weight = model.get_input_embeddings().weight

    def load(self, index: int, layer: nn.Module, device: torch.device) -> None:
        with _ordinary_tensors():
            self._fill(layer, self._prefixes[index], device)

    def unload(self, index: int, layer: nn.Module) -> None:
        from accelerate.utils import set_module_tensor_to_device

        with _ordinary_tensors():
            for name, _ in list(layer.named_parameters()):
                set_module_tensor_to_device(layer, name, "meta")


def open_layer_by_layer(folder: str | Path, *, dtype: torch.dtype, device: torch.device | str,
                        skeleton: nn.Module | None = None) -> tuple[nn.Module, CheckpointWeights]:
    """The checkpoint in `folder` as a model whose decoder layers stay on disk until they run.

    Everything outside the layers is read onto `device`; the layers are meta tensors that
    `CheckpointWeights.load` fills one at a time. Per-layer widths are kept (the skeleton comes from
    the folder's config; a caller that built it already, `model_skeleton(folder, dtype=dtype,
    buffers=True)`, passes it).
    """
    from pruneflow.architectures import check_supported
    from pruneflow.checkpoint import model_skeleton

    model = skeleton if skeleton is not None else model_skeleton(folder, dtype=dtype, buffers=True)
    check_supported(model)
    weights = CheckpointWeights(folder, model, dtype)
    weights.load_outside_layers(model, device)
    return model.eval(), weights


# ------------------------------------------------------------------------------------------ execution


@dataclass
class LayerInputs:
    """What the decoder layers get, per calibration batch: the hidden states entering the next layer
    to run and every layer's own keyword arguments (mask, rotary table, position ids)."""

    hidden: list[torch.Tensor]
    arguments: list[list[dict]]  # [layer][batch]


@torch.no_grad()
def capture_inputs(model: nn.Module, input_ids: torch.Tensor, *, batch_size: int,
                   device: torch.device | str) -> LayerInputs:
    """Embed every batch and record each layer's keyword arguments, without running any layer.

    The modules outside the layers must be on `device` (`outside_layers_to`, or `open_layer_by_layer`).
    """
    count = len(decoder_layers(model))
    hidden: list[torch.Tensor] = []
    arguments: list[list[dict]] = [[] for _ in range(count)]

    def on_call(index: int, states: torch.Tensor, kwargs: dict) -> None:
        if index == 0:
            hidden.append(states)
        arguments[index].append({k: v for k, v in kwargs.items() if k != "past_key_values"})
        if index == count - 1:
            raise _StopForward

    with _layers_replaced(model, on_call):
        for chunk in input_ids.split(batch_size):
            with contextlib.suppress(_StopForward):
                model(input_ids=chunk.to(device), use_cache=False)
    return LayerInputs(hidden=hidden, arguments=arguments)


@torch.no_grad()
def run_layers(model: nn.Module, inputs: LayerInputs, weights: LayerWeights, device: torch.device | str, *,
               layers: Sequence[int] | None = None,
               before_batch: Callable[[int], None] | None = None,
               after_layer: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """Run `layers` (all by default, in order) one at a time, each on every batch; the last one's outputs.

    Each batch's output replaces its input in `inputs.hidden` (the list returned), so one copy of the
    hidden states is alive plus one batch's output: a caller that needs a layer's inputs afterwards
    keeps its own list of them. `after_layer(index)` runs once a layer has seen every batch (what a
    hook gathered on that layer is complete, and can leave the device)."""
    blocks = decoder_layers(model)
    device = torch.device(device)
    hidden = inputs.hidden
    for index in range(len(blocks)) if layers is None else layers:
        layer = blocks[index]
        arguments = inputs.arguments[index]
        if len(arguments) != len(hidden):
            raise ValueError(f"layer {index} has arguments for {len(arguments)} batches, the hidden states "
                             f"{len(hidden)}")
        weights.load(index, layer, device)
        try:
            for batch, kwargs in enumerate(arguments):
                if before_batch is not None:
                    before_batch(batch)
                out = layer(hidden[batch], **kwargs)
                hidden[batch] = out[0] if isinstance(out, tuple) else out
        finally:
            weights.unload(index, layer)
        if after_layer is not None:
            after_layer(index)
        log.debug("layer %d of %d done", index + 1, len(blocks))
    return hidden


@contextlib.contextmanager
def outside_on(model: nn.Module, weights: LayerWeights, device: torch.device | str) -> Iterator[None]:
    """Resident models get their embeddings, norm and head onto the device for the pass, and back after."""
    if isinstance(weights, ResidentWeights):
        outside_layers_to(model, device)
    try:
        yield
    finally:
        if isinstance(weights, ResidentWeights):
            outside_layers_to(model, weights.home)


@torch.no_grad()
def forward(model: nn.Module, input_ids: torch.Tensor, *, batch_size: int, device: torch.device | str,
            weights: LayerWeights, before_batch: Callable[[int], None] | None = None,
            logits: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
            layers: Sequence[int] | None = None, after_layer: Callable[[int], None] | None = None) -> None:
    """The whole model on `input_ids` in batches of `batch_size`, one layer at a time: hooks on the
    layers' modules fire as in a whole-model pass (each layer on every batch before the next layer);
    `before_batch(b)` is called before a layer runs batch b and `after_layer(i)` once layer i has run
    every batch; `logits(b, ids, logits)` gets each batch's output logits (the head runs only when it
    is given; `layers`, a prefix of the layers, stops early)."""
    with outside_on(model, weights, device):
        inputs = capture_inputs(model, input_ids, batch_size=batch_size, device=device)
        final = run_layers(model, inputs, weights, device, layers=layers, before_batch=before_batch,
                           after_layer=after_layer)
        del inputs
        if logits is not None:
            if layers is not None and list(layers) != list(range(len(decoder_layers(model)))):
                raise ValueError("logits need every layer to run")
            chunks = list(input_ids.split(batch_size))
            for batch, (ids, out) in enumerate(zip(chunks, head_logits(model, chunks, final, device), strict=True)):
                logits(batch, ids, out)


@torch.no_grad()
def head_logits(model: nn.Module, input_ids: Sequence[torch.Tensor], final_hidden: Sequence[torch.Tensor],
                device: torch.device | str) -> Iterator[torch.Tensor]:
    """The logits of each batch from the last layer's outputs: the model's own forward pass with every
    layer a pass-through and the last one handing back the stored output, so the family's final norm,
    head and soft-capping apply as in a whole-model pass."""
    count = len(decoder_layers(model))
    current: list[torch.Tensor] = []

    def on_call(index: int, _states: torch.Tensor, _kwargs: dict) -> torch.Tensor | None:
        return current[0] if index == count - 1 else None

    with _layers_replaced(model, on_call):
        for ids, states in zip(input_ids, final_hidden, strict=True):
            current[:] = [states]
            yield model(input_ids=ids.to(device), use_cache=False).logits


def head_loss(model: nn.Module, input_ids: torch.Tensor, final_hidden: torch.Tensor) -> torch.Tensor:
    """The model's own next-token loss (labels = inputs) of one batch from the last layer's output,
    differentiable with respect to `final_hidden` (layer-by-layer gradients start here)."""
    count = len(decoder_layers(model))

    def on_call(index: int, _states: torch.Tensor, _kwargs: dict) -> torch.Tensor | None:
        return final_hidden if index == count - 1 else None

    with _layers_replaced(model, on_call):
        return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss


# ------------------------------------------------------------------------------------------ choice


def free_memory_bytes(device: torch.device) -> int:
    """Free memory where the weights would sit: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def weight_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """The model's weights at `dtype` (tied weights counted once); works on the meta device."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for p in model.parameters()) * size


GRADIENTS = ("none", "mean", "fisher")
# where a pass's Gram sums go: none gathered; saved (every layer's kept, then written: cache_activations);
# consumed (each layer's solved as soon as it is complete: the prune stage's parallel re-fit); one_projection
# (one projection's at a time, whole model or layer by layer: the sequential re-fit)
GRAMS = ("none", "saved", "consumed", "one_projection")
FEWER_CALIBRATION_TOKENS = "fewer calibration tokens (calibration.num_samples)"


def refit_grams(prune, *, cached: bool) -> str:
    """What the least-squares re-fit of `prune` (PruneParams) gathers (GRAMS): nothing without a re-fit
    or, in parallel mode, when Gram matrices are `cached`; else each layer's (parallel) or one
    projection's at a time (sequential)."""
    if prune.reconstruction == "none":
        return "none"
    if prune.reconstruction_mode == "sequential":
        return "one_projection"
    return "none" if cached else "consumed"


def gradients_of(criterion) -> str:
    """What a criterion's pass keeps besides the weights (`memory_need`'s `gradients`): Taylor Element^2
    a per-sample Fisher, the other gradient criteria a mean gradient, every other criterion nothing."""
    if getattr(criterion, "uses_fisher", False):
        return "fisher"
    return "mean" if criterion.needs_gradients else "none"


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes a pass needs, whole model at once or one decoder layer at a time.

    On the device: weights, every parameter at the dtype (`copies` of them: the layout search prunes
    a copy of the model per candidate); `gradients` mean: + one gradient per projection weight (same
    dtype) and, for the layer being scored, its float64 element scores; fisher: + float32 running
    gradient and Fisher buffers; `grams` (GRAMS): the float64 sums x x^T and x of the o_proj /
    down_proj inputs (whole model: every layer's; layer by layer: the running layer's) and one batch's
    float32 product; the batches' hidden states entering and leaving a
    layer (`tokens` x hidden x 2), which layer by layer stay on the device between layers. HEADROOM
    covers a layer's internal activations, the head's logits and allocator slack.

    In host memory layer by layer (`host_layer_by_layer`): the model where it stays there (`resident`,
    `copies` times), else the one layer being read from disk; for gradient criteria every layer's
    input hidden states (the backward pass re-runs each layer on them); Gram sums `saved`: every
    layer's and the float32 copies written, `consumed`: one layer's and its solve's working copy,
    `one_projection`: one projection's (on the device too, whole model or not) and its solve's copy.
    Where the device is the host (a CPU) the two are one memory (`layer_by_layer_one_memory`), and a
    resident model's layers run where they are.
    """

    whole_model: int
    layer_by_layer: int
    largest_layer: int
    outside_layers: int
    hidden_states: int
    gram_sums: int = 0
    host_layer_by_layer: int = 0
    layer_by_layer_one_memory: int = 0  # both parts where the device is the host (a CPU)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def memory_need(model: nn.Module, dtype: torch.dtype, *, tokens: int, gradients: str = "none",
                grams: str = "none", resident: bool = False, copies: int = 1) -> MemoryNeed:
    """What `model` (meta or real) needs for a pass over `tokens` calibration or evaluation tokens."""
    from pruneflow.architectures import projection
    from pruneflow.families import PROJECTIONS

    if gradients not in GRADIENTS:
        raise ValueError(f"gradients={gradients!r}; allowed: {', '.join(GRADIENTS)}")
    if grams not in GRAMS:
        raise ValueError(f"grams={grams!r}; allowed: {', '.join(GRAMS)}")
    size = torch.empty((), dtype=dtype).element_size()
    gradient = {"none": 0, "mean": size, "fisher": size + 8}[gradients]  # bytes per projection parameter
    scoring = 0 if gradients == "none" else 8  # float64 element scores of the layer being scored
    blocks = decoder_layers(model)
    resident_bytes, transient, gram_sums, gram_saved, layer_bytes = [], [], [], [], []
    for layer in blocks:
        params = sum(p.numel() for p in layer.parameters())
        projected = sum(projection(layer, name).weight.numel() for name in PROJECTIONS)
        widths = [projection(layer, name).weight.shape[1] for name in ("o_proj", "down_proj")] \
            if grams != "none" else []
        layer_bytes.append(params * size)
        resident_bytes.append(copies * params * size + projected * gradient)
        projection_sums = [8 * (d * d + d) for d in widths]
        gram_sums.append(max(projection_sums, default=0) if grams == "one_projection" else sum(projection_sums))
        gram_saved.append(sum(4 * (d * d + d) for d in widths))
        # the float64 element scores of the layer being scored; a batch's float32 x^T x and its float64 copy
        transient.append(projected * scoring + max((12 * d * d for d in widths), default=0))
    outside = weight_bytes(model, dtype) - sum(p.numel() for p in blocks.parameters()) * size
    hidden = tokens * int(model.config.hidden_size) * size * 2
    largest = max(r + t + g for r, t, g in zip(resident_bytes, transient, gram_sums, strict=True))
    every_layer = max(gram_sums) if grams == "one_projection" else sum(gram_sums)  # Gram sums held at once
    whole = int((copies * outside + sum(resident_bytes) + every_layer + max(transient) + hidden) * HEADROOM)
    streamed = int((outside + largest + hidden) * HEADROOM)
    kept = (len(blocks) * tokens * int(model.config.hidden_size) * size if gradients != "none" else 0) \
        + (sum(gram_sums) + sum(gram_saved) if grams == "saved" else 2 * max(gram_sums))
    if resident:
        host = copies * weight_bytes(model, dtype) + kept
        # one memory: the model is where its layers run; a layer adds its gradient, scores and sums
        extras = [r - copies * w + t + g for r, w, t, g in zip(resident_bytes, layer_bytes, transient, gram_sums,
                                                                 strict=True)]
        one_memory = int((copies * weight_bytes(model, dtype) + max(extras) + hidden) * HEADROOM) + kept
    else:
        host = max(layer_bytes) + kept  # the layer being read from disk
        one_memory = streamed + kept
    return MemoryNeed(whole_model=whole, layer_by_layer=streamed, largest_layer=largest, outside_layers=outside,
                      hidden_states=hidden, gram_sums=every_layer, host_layer_by_layer=host,
                      layer_by_layer_one_memory=one_memory)


def dtype_remedy(dtype: torch.dtype) -> list[str]:
    """`runtime.dtype='bfloat16'` as a way to fit, for a stage that computes in runtime.dtype above 2 bytes."""
    return ["runtime.dtype='bfloat16'"] if torch.empty((), dtype=dtype).element_size() > 2 else []


def choose_execution(setting: str, model: nn.Module, dtype: torch.dtype, device: torch.device, *,
                     tokens: int = 0, gradients: str = "none", grams: str = "none", resident: bool = False,
                     copies: int = 1, on_device: int = 0, what: str = "this stage",
                     remedies: Sequence[str] = ()) -> str:
    """`runtime.execution`: `auto` runs the whole model at once when it fits in the device's free memory
    (`memory_need`; `on_device` bytes of the model that are there already count as free for that), else
    layer by layer (no credit: its estimate counts one layer, not the model, on the device). A path
    that cannot fit is refused before anything is loaded, with the sizes and what would make it fit (`remedies`, the stage's own settings): whole_model set explicitly on a model too
    big, one layer (with the hidden states) more than the device has, or layer by layer more than the
    host has (on a CPU the device and the host are one memory, so both parts count against it)."""
    from pruneflow.errors import ConfigError

    if setting not in EXECUTIONS:
        raise ConfigError(f"runtime.execution={setting!r} is not allowed; allowed: {', '.join(EXECUTIONS)}")
    device = torch.device(device)
    need = memory_need(model, dtype, tokens=tokens, gradients=gradients, grams=grams, resident=resident,
                       copies=copies)
    free = free_memory_bytes(device)
    whole_free = free + on_device  # the model there already needs no room for its weights, run whole
    separate_host = device.type == "cuda"
    streamed = need.layer_by_layer if separate_host else need.layer_by_layer_one_memory
    choice = setting
    if setting == "auto":
        choice = "whole_model" if need.whole_model <= whole_free else "layer_by_layer"
        log.info("runtime.execution=auto for %s: whole model %s, layer by layer %s, %s free on %s -> %s", what,
                 _size(need.whole_model), _size(streamed), _size(whole_free), device, choice)
    allowed = ", ".join(["a device with more free memory", *remedies])
    if choice == "whole_model" and need.whole_model > whole_free:
        raise ConfigError(
            f"runtime.execution='whole_model' does not fit: {what} needs about {_size(need.whole_model)} on "
            f"{device} ({dtype}, gradients: {gradients}), {_size(whole_free)} is free"
            f"{' counting its weights already there' if on_device else ''}; allowed: 'layer_by_layer' or 'auto'")
    if choice == "layer_by_layer" and streamed > free:
        host_part = "" if separate_host else f", what waits in host memory {_size(need.host_layer_by_layer)}"
        raise ConfigError(
            f"runtime.execution={setting!r}: even one layer at a time does not fit: {what} needs about "
            f"{_size(streamed)} on {device} (largest layer {_size(need.largest_layer)}, embeddings and "
            f"head {_size(need.outside_layers)}, hidden states of {tokens} tokens {_size(need.hidden_states)}"
            f"{host_part}), {_size(free)} is free; allowed: {allowed}")
    if choice == "layer_by_layer" and separate_host:
        host_free = free_memory_bytes(torch.device("cpu"))
        if need.host_layer_by_layer > host_free:
            raise ConfigError(
                f"runtime.execution={setting!r}: {what} one layer at a time keeps about "
                f"{_size(need.host_layer_by_layer)} in host memory (the model or the layer being read, "
                + ("every layer's input hidden states, " if gradients != "none" else "")
                + ("every layer's Gram sums, " if grams == "saved" else "")
                + f"at {dtype}), {_size(host_free)} is available; "
                f"allowed: a machine with more memory, {', '.join(remedies) or 'fewer tokens per pass'}")
    return choice


def _size(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.1f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def execution_of(layer_weights: LayerWeights | None) -> str:
    """What `open_model` chose, as stages record it: `whole_model` (no layer source) or `layer_by_layer`."""
    return "whole_model" if layer_weights is None else "layer_by_layer"


def open_model(folder: str | Path, *, execution: str, dtype: torch.dtype, device: torch.device,
               resident: bool = False, tokens: int = 0, gradients: str = "none", grams: str = "none",
               copies: int = 1, what: str = "this stage",
               remedies: Sequence[str] = ()) -> tuple[nn.Module, LayerWeights | None]:
    """The model in `folder` for a stage, as `runtime.execution` (`choose_execution`) says.

    whole_model: loaded onto `device`, no layer source (None). layer_by_layer: a stage that reads a
    layer only while it runs gets the skeleton whose layers stay on disk (`CheckpointWeights`); one
    that needs every weight at hand (`resident`: pruning, weight-based criteria) gets the model in
    host memory (`ResidentWeights`).
    """
    from pruneflow.checkpoint import load_pruned, model_skeleton

    skeleton = model_skeleton(folder, dtype=dtype, buffers=True)
    choice = choose_execution(execution, skeleton, dtype, device, tokens=tokens, gradients=gradients, grams=grams,
                              resident=resident, copies=copies, what=what, remedies=remedies)
    if choice == "whole_model":
        return load_pruned(folder, dtype=dtype, device=device), None
    if resident:
        return load_pruned(folder, dtype=dtype, device="cpu"), ResidentWeights("cpu")
    return open_layer_by_layer(folder, dtype=dtype, device=device, skeleton=skeleton)
