"""The executor that runs any registered merging method, in memory or streamed, with the same driver.

A *source* gives aligned row blocks of every model's tensors (:class:`DictSource` over state dicts in memory; the
streaming engine's inputs over checkpoints on disk); a *sink* receives the output blocks at their byte offsets
(:class:`DictSink` in memory; the sharded safetensors writer on disk). :class:`Executor` walks the tensor plans,
applies the DARE pre-step to the blocks (:class:`Dare`), and :func:`execute` calls the method's kernel on every block
(``element`` and ``model`` scope) or on whole tensors (``tensor`` scope), after the method's model-wide statistics
where it has them. Because both executors run this same code on the same blocks, their bytes are identical.

Model index conventions: index 0 is the pre-trained model (None in memory when a method does not need it) and
1..M the models to merge; the core's ``model_index`` of model ``m`` (which seeds its DARE masks) is ``m - 1``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import torch

from model_merging_methods import rng
from model_merging_methods.devices import resolve_device
from model_merging_methods.errors import MergeError
from model_merging_methods.mask_weights_utils import (
    check_same_parameters,
    compute_dtype,
    dare_values,
    is_excluded,
    mask_tensor,
)
from model_merging_methods.memory import keep_freed_blocks
from model_merging_methods.planning import TensorPlan
from model_merging_methods.registry import MergeMethod, TensorContext, get_method
from model_merging_methods.threads import default_workers, torch_threads  # noqa: F401 - re-exported

StateDict = dict[str, torch.Tensor]
DEVICE_BLOCK_ELEMENTS = 1 << 24  # elements per row block per model off the CPU (fewer, larger launches)


# ----------------------------------------------------------------------------------------------------------------
# threads and progress
# ----------------------------------------------------------------------------------------------------------------


def progress(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr (hidden when not a terminal or when ``enabled`` is false)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=None if enabled else True, leave=False)


# ----------------------------------------------------------------------------------------------------------------
# the DARE pre-step on blocks
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Dare:
    """DARE settings for the models being masked (model index in the executor → core model_index)."""

    rates: dict[int, float]
    use_rescale: bool
    strategy: str
    weight_format: str
    seed: int
    model_index: dict[int, int | None]
    # how survivors are rescaled when use_rescale: "inverse" divides by 1 − p; "l1" multiplies the masked tensor by
    # ‖x‖₁ / ‖m⊙x‖₁ (mergekit's DARE; x the delta, or the weights with finetuned_weight), needing whole tensors
    rescale_rule: str = "inverse"

    def l1(self) -> bool:
        return self.use_rescale and self.rescale_rule == "l1"

    def active(self, m: int) -> bool:
        return self.rates.get(m, 0.0) != 0.0

    @classmethod
    def for_models(
        cls, rates: Sequence[float], use_rescale: bool, strategy: str, weight_format: str, seed: int
    ) -> Dare:
        """DARE of models 1..M with ``rates[i]`` for model i + 1 (core model_index i)."""
        return cls(
            {i + 1: float(r) for i, r in enumerate(rates)}, bool(use_rescale), strategy, weight_format, int(seed),
            {i + 1: i for i in range(len(rates))},
        )  # fmt: skip


class MaskedBlocks:
    """Row blocks of a model after DARE (as ``mask_merging`` stores them: cast back to the model's dtype and upcast
    again for the method that follows). Random DARE draws each block's keep decisions from the counter-based
    generator at the block's flat position, so blocks may come in any order, on any thread and device; magnitude
    DARE needs the whole tensor."""

    def __init__(self, dare: Dare | None, base: int | None, plan: TensorPlan):
        self.dare, self.base, self.plan = dare, base, plan

    def whole(self) -> bool:
        """Magnitude DARE ranks the whole tensor; the L1 rescale needs the whole tensor's norms."""
        d = self.dare
        if d is None or self.plan.excluded or not any(d.active(m) for m in d.rates):
            return False
        return d.strategy == "magnitude" or d.l1()

    def get(self, m: int, x: torch.Tensor, pre: torch.Tensor | None, r0: int = 0) -> torch.Tensor:
        """Model m's block of rows ``r0..`` after DARE; ``x`` and ``pre`` are the upcast blocks of model m and the
        base (on the executor's device)."""
        d, plan = self.dare, self.plan
        if d is None or plan.excluded or not d.active(m):
            return x
        stored = plan.dtypes[m]
        if d.l1():  # whole tensor: mask without rescale, then match the L1 norm (mergekit's rescale)
            from model_merging_methods.sparsify import l1_rescale

            x_in = x if d.weight_format == "finetuned_weight" else x - pre
            masked = mask_tensor(
                plan.name, x_in, None, weight_format="finetuned_weight", weight_mask_rate=d.rates[m],
                use_weight_rescale=False, mask_strategy=d.strategy, seed=d.seed, model_index=d.model_index[m],
                device=x_in.device,
            )  # fmt: skip
            out = l1_rescale(x_in, masked)
            out = out if d.weight_format == "finetuned_weight" else pre + out
            return out.to(stored).to(compute_dtype(stored))
        if d.strategy == "magnitude":  # whole tensor: call the core directly
            out = mask_tensor(
                plan.name, x.to(stored), None if pre is None else pre.to(plan.dtypes[self.base]),
                weight_format=d.weight_format, weight_mask_rate=d.rates[m], use_weight_rescale=d.use_rescale,
                mask_strategy=d.strategy, seed=d.seed, model_index=d.model_index[m],
            )  # fmt: skip
            return out.to(compute_dtype(stored))
        stream = rng.Stream(d.seed, plan.name, d.model_index[m], start=r0 * plan.row_size)
        out = dare_values(x, pre, d.rates[m], d.use_rescale, d.weight_format, stream)
        return out.to(stored).to(compute_dtype(stored))


# ----------------------------------------------------------------------------------------------------------------
# the executor
# ----------------------------------------------------------------------------------------------------------------


class Cancelled(Exception):
    """Raised in a worker when another worker failed (never reaches the user: the first error does)."""


class Executor:
    """Runs passes over a source's aligned tensors and writes the output tensors to a sink.

    Work is spread over ``workers`` threads one whole tensor at a time (every torch op runs on one thread; the ops
    release the GIL); results go straight to their place in the output. Every block's DARE draws depend on its
    position only, so the bytes do not depend on the number of workers or the block size.

    ``device``: where the arithmetic runs (default: the CPU). Blocks are read on the CPU, moved to the device in
    their stored dtype and upcast there (in blocks of :data:`DEVICE_BLOCK_ELEMENTS` elements off the CPU); the
    results come back to the CPU for a sink that writes files.
    """

    def __init__(
        self,
        source,
        sink,
        base: int | None = 0,
        workers: int = 1,
        show_progress: bool = True,
        device: torch.device | str | None = None,
    ):
        self.source, self.sink, self.base = source, sink, base
        self.workers = max(1, int(workers))
        self.show_progress = show_progress
        self.device = resolve_device(device)
        keep_freed_blocks()  # block temporaries reused from the heap, not mapped again (glibc)
        self.stop = threading.Event()  # set when one worker fails or the run is interrupted: the others stop

    @property
    def plans(self) -> list[TensorPlan]:
        return list(self.source.plans.values())

    def row_blocks(self, plan: TensorPlan, whole: bool = False) -> list[tuple[int, int]]:
        """The row ranges a tensor is processed in: the plan's blocks on the CPU, larger ones on other devices."""
        if whole or self.device.type == "cpu" or not plan.shape:
            return plan.blocks(whole=whole)
        rows = plan.shape[0]
        step = max(1, DEVICE_BLOCK_ELEMENTS // max(1, plan.row_size))
        return [(r, min(rows, r + step)) for r in range(0, rows, step)] or [(0, rows)]

    def _block(self, m: int, plan: TensorPlan, r0: int, r1: int) -> torch.Tensor:
        if self.device.type == "cpu":
            return self.source.block(m, plan, r0, r1)
        x = self.source.block(m, plan, r0, r1, upcast=False).to(self.device)  # moved in its stored dtype
        return x.to(compute_dtype(x.dtype)) if plan.is_float else x

    def blocks_for(
        self,
        plan: TensorPlan,
        models: Sequence[int],
        dare: Dare | None,
        whole: bool = False,
        rows: Sequence[tuple[int, int]] | None = None,
    ) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
        """For each row block ``(r0, r1)`` (``rows``, default: every block of the tensor): the upcast (and
        DARE-masked where set) blocks of ``models``, on the executor's device."""
        masked = MaskedBlocks(dare, self.base, plan)
        need_base = self.base in models or (
            dare is not None
            and dare.weight_format == "delta_weight"
            and not plan.excluded
            and any(dare.active(m) for m in models)
        )
        wanted = list(dict.fromkeys([self.base, *models] if need_base else models))
        whole = whole or masked.whole()
        if rows is None or whole:
            rows = self.row_blocks(plan, whole)
        for r0, r1 in rows:
            if self.stop.is_set():
                raise Cancelled
            xs = {m: self._block(m, plan, r0, r1) for m in wanted}
            pre = xs.get(self.base)
            yield r0, r1, [xs[m] if m == self.base else masked.get(m, xs[m], pre, r0) for m in models]

    def map_tensors(
        self, plans: Sequence[TensorPlan], fn: Callable[[TensorPlan], Any], desc: str
    ) -> list[Any]:
        """``[fn(plan) for plan in plans]`` on the worker threads (results in order; first error re-raised)."""
        with progress(len(plans), desc, self.show_progress) as bar:
            if self.workers == 1 or len(plans) < 2:
                out = []
                for plan in plans:
                    out.append(fn(plan))
                    bar.update(1)
                return out
            with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="merge") as pool:
                futures = [pool.submit(fn, plan) for plan in plans]
                try:
                    for f in as_completed(futures):
                        f.result()
                        bar.update(1)
                except BaseException:
                    self.stop.set()
                    for f in futures:
                        f.cancel()
                    raise
                return [f.result() for f in futures]

    def stream_unordered(
        self, plans: Sequence[TensorPlan], produce: Callable[[TensorPlan], Iterator[Any]]
    ) -> Iterator[Any]:
        """Every item ``produce(plan)`` yields, for all plans, computed on the worker threads and yielded in
        completion order (for order-independent consumers such as the k-th value histogram)."""
        if self.workers == 1:
            for plan in plans:
                yield from produce(plan)
            return
        results: queue.Queue = queue.Queue(maxsize=2 * self.workers)
        stop = threading.Event()
        todo = iter(plans)
        todo_lock = threading.Lock()
        done_marker = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    results.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def worker() -> None:
            try:
                while not stop.is_set():
                    with todo_lock:
                        plan = next(todo, None)
                    if plan is None:
                        break
                    for item in produce(plan):
                        if not put(item):
                            return
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                put(exc)
            finally:
                put(done_marker)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(self.workers)]
        for t in threads:
            t.start()
        try:
            finished = 0
            while finished < len(threads):
                item = results.get()
                if item is done_marker:
                    finished += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            stop.set()
            for t in threads:
                t.join()

    def write_blocks(self, plan: TensorPlan, blocks: Iterable[torch.Tensor]) -> None:
        """Write a tensor's consecutive row blocks (cast to the output dtype) at their place in the output."""
        offset = 0
        for out in blocks:
            out = self.to_sink(out.to(plan.out_dtype))
            self.sink.write_at(plan.name, offset, out)
            offset += out.numel() * out.element_size()

    def to_sink(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the CPU, unless the sink takes tensors on any device (the in-memory sink)."""
        if tensor.device.type == "cpu" or getattr(self.sink, "accepts_device_tensors", False):
            return tensor
        return tensor.cpu()

    def copy(self, plan: TensorPlan, source: int) -> None:
        """Write model ``source``'s tensor unchanged (excluded or non-float tensors), cast to the output dtype."""
        passthrough = getattr(self.sink, "put", None)
        if passthrough is not None and hasattr(self.source, "tensor"):
            passthrough(plan.name, self.source.tensor(source, plan.name))
            return
        self.write_blocks(
            plan, (self.source.block(source, plan, r0, r1, upcast=False) for r0, r1 in plan.blocks())
        )

    def elementwise(
        self,
        models: Sequence[int],
        fn: Callable[[TensorPlan, list[torch.Tensor]], torch.Tensor],
        dare: Dare | None,
        copy_from: int,
        desc: str,
    ) -> None:
        """One pass: out = fn(blocks of ``models``) for every tensor; excluded/non-float tensors from ``copy_from``."""

        def one(plan: TensorPlan) -> None:
            if plan.excluded or not plan.is_float:
                self.copy(plan, copy_from)
            else:
                self.write_blocks(plan, (fn(plan, xs) for _, _, xs in self.blocks_for(plan, models, dare)))

        self.map_tensors(self.plans, one, desc)


# ----------------------------------------------------------------------------------------------------------------
# running a registered method
# ----------------------------------------------------------------------------------------------------------------


class StatisticsView:
    """What a method's ``model_statistics`` may read: the non-excluded float tensors of every model, after DARE, as
    factories of block iterators (each call is one pass over the inputs, blocks in any order)."""

    def __init__(
        self,
        executor: Executor,
        fts: Sequence[int],
        dare: Dare | None,
        data: Mapping[str, Sequence] | None,
        dare_for: Callable[[str], Dare | None] | None = None,
    ):
        self.executor, self.fts, self.dare = executor, list(fts), dare
        self.plans = [p for p in executor.plans if p.is_float and not p.excluded]
        self.data = dict(data or {})
        self.dare_for = dare_for  # per-tensor DARE settings (default: ``dare`` for every tensor)

    def _dare(self, plan: TensorPlan) -> Dare | None:
        return self.dare_for(plan.name) if self.dare_for is not None else self.dare

    @property
    def num_models(self) -> int:
        return len(self.fts)

    @property
    def kept_numel(self) -> int:
        """Elements of all non-excluded float tensors (one model)."""
        return sum(p.numel for p in self.plans)

    def task_vectors(self, i: int, plans: Sequence[TensorPlan] | None = None) -> Callable[[], Iterator]:
        """A factory of τ_i blocks (model i's block minus the base's) over ``plans`` (default: every kept tensor)."""
        ex, m = self.executor, self.fts[i]

        def produce(plan: TensorPlan) -> Iterator[torch.Tensor]:
            for _, _, (pre, x) in ex.blocks_for(plan, [ex.base, m], self._dare(plan)):
                yield x - pre

        return lambda: ex.stream_unordered(plans if plans is not None else self.plans, produce)

    def blocks(self, plans: Sequence[TensorPlan] | None = None) -> Callable[[], Iterator]:
        """A factory of ``(plan, base block, [model blocks])`` over ``plans`` (default: every kept tensor)."""
        ex = self.executor

        def produce(plan: TensorPlan) -> Iterator[tuple]:
            for _, _, (pre, *xs) in ex.blocks_for(plan, [ex.base, *self.fts], self._dare(plan)):
                yield plan, pre, xs

        return lambda: ex.stream_unordered(plans if plans is not None else self.plans, produce)

    def map_blocks(
        self,
        fn: Callable[[TensorPlan, torch.Tensor, list[torch.Tensor]], Any],
        plans: Sequence[TensorPlan] | None = None,
        rows_for: Callable[[TensorPlan], Sequence[tuple[int, int]]] | None = None,
        models: Sequence[int] | None = None,
    ) -> Callable[[], Iterator]:
        """A factory of ``fn(plan, base block, [model blocks])`` over ``plans`` (default: every kept tensor), computed
        on the worker threads; ``rows_for(plan)`` picks the row ranges read (default: all), ``models`` the positions
        in ``fts`` of the models read (default: all)."""
        ex = self.executor
        fts = self.fts if models is None else [self.fts[i] for i in models]

        def produce(plan: TensorPlan) -> Iterator[Any]:
            rows = rows_for(plan) if rows_for is not None else None
            for _, _, (pre, *xs) in ex.blocks_for(plan, [ex.base, *fts], self._dare(plan), rows=rows):
                yield fn(plan, pre, xs)

        return lambda: ex.stream_unordered(plans if plans is not None else self.plans, produce)


def execute(
    executor: Executor,
    method: MergeMethod,
    params: Mapping[str, Any],
    fts: Sequence[int],
    dare: Dare | None = None,
    *,
    seed: int = 0,
    data: Mapping[str, Sequence[Mapping[str, torch.Tensor]]] | None = None,
    params_for: Callable[[str], Mapping[str, Any]] | None = None,
    dare_for: Callable[[str], Dare | None] | None = None,
) -> dict[str, Any]:
    """Merge models ``fts`` (executor indices) with ``method`` into the executor's sink; returns the method's
    details for the manifest (its model-wide statistics, when JSON-able).

    Per-tensor settings (mergekit's gradients and filters): ``params_for(name)`` gives the validated parameters of
    tensor ``name`` (default: ``params`` for every tensor) and ``dare_for(name)`` its DARE pre-step (default:
    ``dare``). A method whose scope needs model-wide statistics (TIES's global trim) refuses per-tensor parameters."""
    fts = list(fts)
    if method.needs_base and executor.base is None:
        raise MergeError(f"{method.name} needs the pretrained model")
    copy_from = executor.base if method.copy_from == "base" else fts[0]
    if params_for is not None:
        for plan in executor.plans:
            if plan.is_float and not plan.excluded and method.scope_for(params_for(plan.name)) == "model":
                raise MergeError(
                    f"{method.name} with these parameters needs model-wide statistics, so its parameters cannot vary "
                    f"per tensor (tensor {plan.name})"
                )
    stats = None
    if method.model_statistics is not None:
        stats = method.model_statistics(params, StatisticsView(executor, fts, dare, data, dare_for))
    models = [executor.base, *fts] if method.needs_base else fts
    indices = tuple(m - 1 for m in fts)
    data = data or {}

    def one(plan: TensorPlan) -> None:
        if plan.excluded or not plan.is_float:
            executor.copy(plan, copy_from)
            return
        tensor_params = params_for(plan.name) if params_for is not None else params
        tensor_dare = dare_for(plan.name) if dare_for is not None else dare
        whole = method.scope_for(tensor_params) == "tensor"
        tensor_data = {k: [d.get(plan.name) for d in v] for k, v in data.items()}

        def outs() -> Iterator[torch.Tensor]:
            for r0, _, xs in executor.blocks_for(plan, models, tensor_dare, whole=whole):
                ctx = TensorContext(plan.name, plan.shape, r0, indices, seed, stats, tensor_data)
                base, tensors = (xs[0], xs[1:]) if method.needs_base else (None, xs)
                yield method.kernel(base, tensors, tensor_params, ctx)

        executor.write_blocks(plan, outs())

    executor.map_tensors(executor.plans, one, method.label)
    details = stats.as_dict() if hasattr(stats, "as_dict") else {}
    return details


# ----------------------------------------------------------------------------------------------------------------
# in memory
# ----------------------------------------------------------------------------------------------------------------


class DictSource:
    """State dicts as a source: ``models[0]`` the pre-trained model (or None), ``models[1:]`` the models to merge.
    Every tensor's output dtype is the one of model ``dtype_from`` (as the in-memory functions cast back)."""

    def __init__(
        self,
        models: Sequence[Mapping[str, torch.Tensor] | None],
        labels: Sequence[str],
        exclude: Iterable[str] = (),
        dtype_from: int = 0,
    ):
        present = [(m, label) for m, label in zip(models, labels) if m is not None]
        names = check_same_parameters([m for m, _ in present], [label for _, label in present])
        self.models = list(models)
        exclude = tuple(exclude)
        ref = self.models[dtype_from]
        self.plans: dict[str, TensorPlan] = {}
        for n in names:
            dtypes = {i: m[n].dtype for i, m in enumerate(self.models) if m is not None}
            shape = tuple(ref[n].shape)
            self.plans[n] = TensorPlan(
                name=n, shape=shape, rows={i: (shape[0] if shape else 1) for i in dtypes}, dtypes=dtypes,
                out_dtype=ref[n].dtype, is_float=all(d.is_floating_point for d in dtypes.values()),
                excluded=is_excluded(n, exclude),
            )  # fmt: skip

    def tensor(self, m: int, name: str) -> torch.Tensor:
        return self.models[m][name]

    def block(self, m: int, plan: TensorPlan, r0: int, r1: int, upcast: bool = True) -> torch.Tensor:
        t = self.models[m][plan.name].detach()
        x = t if not plan.shape else t[r0:r1]
        if plan.is_float and upcast:
            x = x.to(compute_dtype(x.dtype))
        return x


class DictSink:
    """Collects the output tensors in memory (allocated on the device of the model each one's dtype comes from)."""

    accepts_device_tensors = True

    def __init__(self, source: DictSource, device_from: int):
        self.source, self.device_from = source, device_from
        self.out: StateDict = {}
        self._flat: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def put(self, name: str, tensor: torch.Tensor) -> None:
        self.out[name] = tensor

    def write_at(self, name: str, byte_offset: int, tensor: torch.Tensor) -> None:
        with self._lock:
            flat = self._flat.get(name)
            if flat is None:
                plan = self.source.plans[name]
                device = self.source.models[self.device_from][name].device
                full = torch.empty(plan.shape, dtype=plan.out_dtype, device=device)
                self.out[name], flat = full, full.view(-1)
                self._flat[name] = flat
        start = byte_offset // flat.element_size()
        flat[start : start + tensor.numel()] = tensor.reshape(-1).to(flat.device)

    def result(self) -> StateDict:
        return {n: self.out[n] for n in self.source.plans}


def merge_in_memory(
    method: str | MergeMethod,
    pretrained: Mapping[str, torch.Tensor] | None,
    models_to_merge: Sequence[Mapping[str, torch.Tensor]],
    exclude_param_names_regex: Iterable[str] = (),
    *,
    dare: Dare | None = None,
    seed: int = 0,
    data: Mapping[str, Sequence[Mapping[str, torch.Tensor]]] | None = None,
    device: torch.device | str | None = None,
    **params: Any,
) -> StateDict:
    """Merge state dicts with a registered method (and an optional DARE pre-step); returns a new state dict.
    Excluded parameters (``re.match``) and non-float tensors come from the pre-trained model (from the first model
    for methods without one); every other tensor is the kernel's result in that model's dtype. ``device`` is where
    the arithmetic runs, a block at a time (default: the CPU; the inputs may stay on the CPU); the results are on
    the device of the model each one's dtype comes from."""
    method = get_method(method) if isinstance(method, str) else method
    if len(models_to_merge) == 0:
        raise MergeError("no models given (the list of models to merge is empty)")
    if method.needs_base and pretrained is None:
        raise MergeError(f"{method.name} needs the pretrained model")
    for stat in method.data_statistics:
        if data is None or stat.name not in data:
            raise MergeError(f"{method.name} needs {stat.name} ({stat.help})")
    validated = method.validate(params, len(models_to_merge))
    use_base = method.needs_base or (dare is not None and dare.weight_format == "delta_weight")
    if dare is not None and dare.weight_format == "delta_weight" and pretrained is None:
        raise MergeError("delta_weight masking needs the pretrained model")
    base_model = pretrained if use_base else None
    labels = ["the pretrained model"] + [f"model {i}" for i in range(len(models_to_merge))]
    dtype_from = 0 if method.copy_from == "base" else 1
    source = DictSource([base_model, *models_to_merge], labels, exclude_param_names_regex, dtype_from)
    sink = DictSink(source, dtype_from)
    # as the streamed merge: one tensor per worker thread, every op on one thread (torch's intra-op threads on
    # blocks of 2^18 elements cost more than they give: 30x more CPU time on a busy 2-core machine)
    executor = Executor(
        source,
        sink,
        base=0 if base_model is not None else None,
        workers=default_workers(),
        show_progress=False,
        device=device,
    )
    fts = list(range(1, len(models_to_merge) + 1))
    if executor.base is None and method.copy_from == "base":  # pragma: no cover - guarded above
        raise MergeError(f"{method.name} needs the pretrained model")
    with torch_threads(1):
        execute(executor, method, validated, fts, dare, seed=seed, data=data)
    return sink.result()


def check_finite_result(state: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`MergeError` naming the first tensor with NaN or Inf."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise MergeError(f"the merged tensor {name} is not finite (NaN or Inf)")
