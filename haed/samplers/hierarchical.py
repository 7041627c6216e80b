"""The sampler of a HAED model: next-byte distributions for many streams at once, with the main model's
and the decoder's key/value caches, fixed-shape steps captured as CUDA graphs, and the whole-patch step
(optionally compiled, or with Triton kernels: `haed.kernels`).
"""

from __future__ import annotations

import contextlib

import torch

from haed.errors import HaedError
from haed.layers import START
from haed.model import HAED
from haed.samplers.prefill import broadcast_cache, prompt_rows
from haed.sampling import SamplingOptions, StreamNoise, sample_bytes


class HierarchicalSampler:
    """Next-byte distributions of a HAED model for `batch` streams, one byte at a time, with both caches.

    `start(prompt)` then alternately read `logits` (B, 256) for the next bytes and `feed(bytes)` (B,).

    A prompt shared by all streams is prefilled once at batch 1 and its cache copied to every row,
    so each stream's prefill is the very computation of a single-stream run.

    After the prefill, every step has fixed shapes: the main model writes its new patch at a device-side
    position and attends over its whole (masked) cache, and decoder position k has its own step. On CUDA
    these K + 1 steps are captured once (per batch size: one sampler, one shape) as CUDA graphs, so a
    byte costs one graph replay instead of a few hundred kernel launches from Python. Elsewhere (or with
    `cuda_graphs=False`) the same steps run eagerly.

    `sample_patch` goes further: after `set_sampling`, one whole patch (K decoder steps, each drawing its
    byte on the device with the counter-based noise of its output position, then the encoder and the
    main model's step) is one fixed-shape step, on CUDA one graph replay per K bytes with nothing
    between the bytes on the host. It runs the same operations as `feed` and `sample_bytes` byte by
    byte, so it draws the same bytes.

    `decoder_kernels`: the patch step's K decoder steps run as a Triton kernel (`haed.kernels`: one
    launch per patch when it draws the bytes, one per byte for top-k and top-p); for one stream, where
    `MainKernels` supports the model, the encoder and main model's step too (one launch), else as before
    (compiled with `compile_patch`). CUDA only; the same model up to the order of float32 sums, so a
    draw can change only at a near tie.
    """

    def __init__(
        self,
        model: HAED,
        context_patches: int,
        cuda_graphs: bool = True,
        batch: int = 1,
        compile_patch: bool = False,
        decoder_kernels: bool = False,
    ):
        if decoder_kernels:
            from haed.kernels import unsupported_reason

            reason = unsupported_reason(model)
            if reason is not None:
                raise HaedError(f"the Triton decoder kernels cannot run here: {reason}")
        self.model = model
        self.compile_patch = compile_patch  # run the whole-patch step through torch.compile (`compiled_patch_step`)
        self.decoder_kernels = decoder_kernels  # the whole-patch step's decoder as Triton kernels (`haed.kernels`)
        self.kernels = None  # made on first use, over the buffers and caches of `_make_caches`
        self.main_kernels = None  # likewise, where `MainKernels` supports the model and batch
        self.K = model.patch_size
        self.batch = batch
        self.context_patches = max(2, context_patches)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.main_cache = self.decoder_cache = None  # made by start(), in the dtype of the activations
        self.prefill_cache = None  # batch 1, for a prompt shared by every stream
        self.history: list[torch.Tensor] = []  # complete patches fed to the main model, (B, K) each
        self.filled = 0  # bytes of the current patch so far
        self.logits: torch.Tensor | None = None
        # Static inputs of the fixed-shape steps.
        self.patch_bytes = torch.zeros(batch, 1, self.K, dtype=torch.uint8, device=self.device)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.start_token = torch.full((batch, 1), START, dtype=torch.long, device=self.device)
        self.position = torch.zeros((), dtype=torch.long, device=self.device)
        self.cond: torch.Tensor | None = None  # decoder conditioning of the current patch
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.graphs: list | None = None
        # The whole-patch step (`sample_patch`): the sampling rule, the noise, and its static buffers.
        self.options: SamplingOptions | None = None
        self.noise: StreamNoise | None = None
        self.patch_offsets = torch.arange(self.K, dtype=torch.long, device=self.device)
        self.noise_positions = torch.zeros(self.K, dtype=torch.long, device=self.device)  # output positions
        self.patch_out = torch.zeros(self.K, batch, dtype=torch.uint8, device=self.device)  # the K bytes drawn
        self.patch_graph: torch.cuda.CUDAGraph | None = None

    # -- the fixed-shape steps: 0 is the main model's step, 1 + k the decoder's step at position k
    def _main_step(self) -> None:
        vector = self.model.encoder(self.patch_bytes)
        h = self.model.main(vector, self.main_cache, pos=self.position)[:, -1]
        self.cond.copy_(self.model.decoder.conditioning_vectors(h))

    def _decoder_step(self, k: int) -> torch.Tensor:
        self.decoder_cache.length = k
        tokens = self.start_token if k == 0 else self.token
        return self.model.decoder.step(self.cond, tokens, self.decoder_cache)[:, -1]

    def _patch_step(self) -> None:
        """One whole patch in fixed shapes: K decoder steps, each drawing its byte with the noise of output
        position `noise_positions[k]`, into `patch_out`; then the encoder and the main model's step."""
        gumbel = None if self.noise is None else self.noise.gumbel_at(self.noise_positions)  # (B, K, 256)
        for k in range(self.K):
            if k:
                self.token.copy_(self.patch_bytes[:, 0, k - 1 : k])
            logits = self._decoder_step(k)
            self.patch_bytes[:, 0, k].copy_(
                sample_bytes(logits, self.options, None if gumbel is None else gumbel[:, k])
            )
        self.patch_out.copy_(self.patch_bytes[:, 0].t())  # one copy per patch, not one per byte
        self._main_step()

    def _kernel_patch_step(self) -> None:
        """`_patch_step` with the decoder's K steps as a Triton kernel (`haed.kernels`). It draws greedy and
        temperature-only bytes itself, all K in one launch; for top-k or top-p it gives each position's
        logits to `sample_bytes`."""
        if self.kernels is None:
            from haed.kernels import DecoderKernels, MainKernels, main_unsupported_reason

            self.kernels = DecoderKernels(
                self.model.decoder,
                self.decoder_cache,
                self.cond,
                self.patch_bytes,
                self.options,
                self.noise,
                self.noise_positions,
            )
            if main_unsupported_reason(self.model, self.batch) is None:
                self.main_kernels = MainKernels(self.model, self.main_cache, self.patch_bytes, self.position, self.cond)
        if self.kernels.draws:
            self.kernels.patch()  # the K bytes in one launch
        else:
            gumbel = None if self.noise is None else self.noise.gumbel_at(self.noise_positions)
            for k in range(self.K):
                logits = self.kernels.step(k)
                noise = None if gumbel is None else gumbel[:, k]
                self.patch_bytes[:, 0, k].copy_(sample_bytes(logits, self.options, noise))
        self.patch_out.copy_(self.patch_bytes[:, 0].t())
        if self.main_kernels is not None:
            self.main_kernels.step()
        elif self.compile_patch:
            compiled_main_step()(self)
        else:
            self._main_step()

    def _run_patch_step(self) -> None:
        if self.decoder_kernels:
            self._kernel_patch_step()
        elif self.compile_patch:
            compiled_patch_step()(self)
        else:
            self._patch_step()

    def _step(self, i: int):
        if self.use_graphs:
            if self.graphs is None:
                self.graphs = self._record(
                    [self._main_step] + [lambda k=k: self._decoder_step(k) for k in range(self.K)]
                )
            graph, out = self.graphs[i]
            graph.replay()
            return None if out is None else out.clone()
        return self._main_step() if i == 0 else self._decoder_step(i - 1)

    @contextlib.contextmanager
    def _state_kept(self):
        """Run steps for their side effects only (a graph's warm-up and capture, a compilation): every
        buffer a step writes is put back afterwards, the decoder's cache too, so that a patch begun by
        the prompt continues as if nothing had run. The main model's steps write the spare slot."""
        dec = self.decoder_cache
        buffers = [self.cond, self.position, self.patch_bytes, self.token, *dec.k, *dec.v]
        saved, length = [buffer.clone() for buffer in buffers], self.main_cache.length
        self.position.fill_(self.context_patches)  # the spare slot
        try:
            yield
        finally:
            self.main_cache.length, dec.length = length, 0
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)

    def _record(self, steps) -> list:
        """Record each step as a CUDA graph (after a warm-up run on a side stream, as CUDA requires):
        [(graph, its output)]. The sampler's state is as before."""
        # Weights cast by autocast inside the graph must not come from autocast's cache, which is
        # freed when the autocast region ends; so capture with the cache off (the casts are replayed).
        amp = torch.is_autocast_enabled("cuda")
        ctx = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=amp, cache_enabled=False)
        graphs = []
        with ctx, self._state_kept():
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for f in steps:
                    f()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for f in steps:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = f()
                graphs.append((graph, out))
        return graphs

    def _recorded_patch_graph(self) -> torch.cuda.CUDAGraph:
        """The whole-patch step's CUDA graph, captured on first use."""
        if self.patch_graph is None:
            ((self.patch_graph, _),) = self._record([self._run_patch_step])
        return self.patch_graph

    def set_sampling(self, options: SamplingOptions, noise: StreamNoise | None) -> None:
        """The rule and the noise (None for greedy) that `sample_patch` draws with."""
        self.options, self.noise, self.patch_graph, self.kernels, self.main_kernels = options, noise, None, None, None

    def can_sample_patch(self) -> bool:
        """At a patch boundary, with room in the main model's context for the patch's step."""
        return self.options is not None and self.filled == 0 and self.main_cache.length < self.context_patches

    @torch.no_grad()
    def sample_patch(self, position: int) -> torch.Tensor:
        """Draw the next K bytes of every stream (output positions position .. position + K - 1): (K, B) uint8
        on the device, valid until the next call. Leaves the sampler as `feed` of those bytes would."""
        torch.add(self.patch_offsets, position, out=self.noise_positions)
        self.position.fill_(self.main_cache.length)
        if self.use_graphs:
            self._recorded_patch_graph().replay()
        else:
            self._run_patch_step()
        self.history.append(self.patch_bytes[:, 0].clone())
        self.main_cache.length += 1
        self.filled = 0
        self.logits = None  # the next patch's first distribution: computed if `current_logits` asks
        return self.patch_out

    def current_logits(self) -> torch.Tensor:
        """(B, 256) logits of the next bytes."""
        if self.logits is None:
            self.logits = self._step(1)
        return self.logits

    def _make_caches(self) -> None:
        """Key/value caches and the conditioning buffer in the activations' dtype: bf16 under CUDA
        autocast, else the weights'."""
        amp = self.device.type == "cuda" and torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda") if amp else self.dtype
        if self.main_cache is not None and self.main_cache.k[0].dtype == dtype:
            return
        # One slot more than the context: graph capture writes its warm-up step there, where no real
        # position ever looks.
        self.main_cache = self.model.main.new_cache(self.batch, self.context_patches + 1, self.device, dtype)
        if self.batch > 1:
            self.prefill_cache = self.model.main.new_cache(1, self.context_patches + 1, self.device, dtype)
        self.decoder_cache = self.model.decoder.stack.new_cache(self.batch, self.K, self.device, dtype)
        decoder = self.model.decoder
        width = decoder.token_embedding.embedding_dim
        self.cond = torch.zeros(
            self.batch, decoder.condition.out_features // width, width, device=self.device, dtype=dtype
        )
        self.graphs = self.patch_graph = self.kernels = self.main_kernels = None

    @torch.no_grad()
    def start(self, prompt: torch.Tensor) -> torch.Tensor:
        """Prefill with `prompt` (uint8: (L,) for every stream, or (B, L)); returns the (B, 256) next-byte logits."""
        self._make_caches()
        prompt = prompt_rows(prompt.to(self.device), self.batch)
        full = prompt.shape[1] // self.K
        patches = prompt[:, : full * self.K].reshape(prompt.shape[0], full, self.K)
        keep = patches[:, -(self.context_patches - 1) :] if full >= self.context_patches else patches
        self.history = [keep[:, t].expand(self.batch, self.K) for t in range(keep.shape[1])]
        self._prefill_main(keep)
        for j in range(full * self.K, prompt.shape[1]):
            self.feed(prompt[:, j].expand(self.batch))
        # The whole-patch step is captured (or compiled) here, with the prefill, so that the first patch
        # costs what every other does.
        if self.options is not None and self.use_graphs:
            self._recorded_patch_graph()
        elif self.options is not None and (self.compile_patch or self.decoder_kernels):
            with self._state_kept():
                self._run_patch_step()
        return self.logits

    def _prefill_main(self, patches: torch.Tensor) -> None:
        """Run the main model over `patches` (1 or B, T, K) at once (shapes vary: never in a graph); begin the
        next patch."""
        rows = patches.shape[0]
        cache = self.main_cache if rows == self.batch else self.prefill_cache
        cache.reset()
        inputs = self.model.start.to(self.dtype).view(1, 1, -1).expand(rows, 1, -1)
        if patches.shape[1]:
            inputs = torch.cat((inputs, self.model.encoder(patches)), dim=1)
        h = self.model.main(inputs, cache)[:, -1]
        if cache is not self.main_cache:
            broadcast_cache(cache, self.main_cache)
        self.cond.copy_(self.model.decoder.conditioning_vectors(h))  # (1 or B, ...) into (B, ...)
        self.filled = 0
        self.logits = self._step(1)

    @torch.no_grad()
    def feed(self, byte: torch.Tensor) -> torch.Tensor:
        """Append one byte per stream (a (B,) tensor); returns the (B, 256) logits of the bytes after them."""
        byte = byte.to(self.device).view(self.batch)
        self.patch_bytes[:, 0, self.filled].copy_(byte)
        self.filled += 1
        if self.filled < self.K:
            self.token.copy_(byte.view(self.batch, 1))
            self.logits = self._step(1 + self.filled)
            return self.logits
        self.history.append(self.patch_bytes[:, 0].clone())
        if self.main_cache.length >= self.context_patches:
            # The main model's context is full: start again from the last half of it (rotary
            # positions cannot be shifted in place, so the kept patches are re-encoded once).
            keep = torch.stack(self.history[-(self.context_patches // 2) :], dim=1)
            self.history = list(keep.unbind(1))
            self._prefill_main(keep)
            return self.logits
        self.position.fill_(self.main_cache.length)
        self._step(0)
        self.main_cache.length += 1
        self.filled = 0
        self.logits = self._step(1)
        return self.logits


_compiled_patch_step = None


def compiled_patch_step():
    """`HierarchicalSampler._patch_step` through torch.compile, made once per process.

    The sampler is an argument, so samplers of the same architecture, batch and sampling rule share
    one compiled step: a new shape or rule compiles again. Compiled, a decoder layer's norms, rotary
    rotation, residuals and activation fuse into a few kernels, where the eager step launches each
    operation as its own kernel (about 144 per byte at the `speech` architecture, which is what a
    patch's CUDA graph replay spends its time on: docs/performance.md). The arithmetic is the same
    up to the rounding of fused operations, so a draw can change only at a near tie.

    With inductor's coordinate-descent tuning on, a product with one row (every Linear of a single
    stream, and a query's attention scores) is written as a fused multiply-and-sum kernel instead of a
    matrix-multiply call, tuned for memory bandwidth: the profile of the compiled step without it spent
    about half its device time in some 130 one-row matrix products of about 3 us each
    (docs/performance.md). It also tunes the block sizes of the other generated kernels.
    """
    global _compiled_patch_step
    if _compiled_patch_step is None:
        _compiled_patch_step = torch.compile(
            HierarchicalSampler._patch_step, dynamic=False, options={"coordinate_descent_tuning": True}
        )
    return _compiled_patch_step


_compiled_main_step = None


def compiled_main_step():
    """`HierarchicalSampler._main_step` (the encoder and the main model's step) through torch.compile, made
    once per process: the compiled part of a patch step whose decoder runs as Triton kernels. Tuned as
    `compiled_patch_step` is."""
    global _compiled_main_step
    if _compiled_main_step is None:
        _compiled_main_step = torch.compile(
            HierarchicalSampler._main_step, dynamic=False, options={"coordinate_descent_tuning": True}
        )
    return _compiled_main_step
