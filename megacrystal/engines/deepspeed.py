"""The DeepSpeed engine: the same Crystal model, trained with ZeRO stage 0-3 (and megatron-core TP).

The model is megatron-core's (model/crystal.py) with the layout-independent init, so both engines start from
identical weights. DeepSpeed sees megatron's parallel_state through `MegatronMPU`, so ZeRO partitions over
megatron's data-parallel group and its grad norm counts tensor-parallel shards once. The optimizer is a
client torch AdamW (no C++ build; DeepSpeed's CPU Adam under ZeRO-Offload) holding Crystal's muP groups.
Loss semantics match the megatron engine: the gradient is d(sum of masked token losses over the global
batch) / (global token count).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ..config import Config
from ..distributed.runtime import Layout
from ..kernels.select import announce, select_kernels
from ..model.crystal import build_model_chunks
from ..model.init import init_crystal_weights
from ..model.names import param_kind
from ..model.param_groups import group_multipliers
from .base import Microbatch, StepResult
from .deepspeed_config import build_deepspeed_config, offload_devices

_CHECKPOINT_TAG = "zero"  # DeepSpeed's sub-directory of the engine's checkpoint directory


class MegatronMPU:
    """megatron-core's parallel_state in the shape of DeepSpeed's `mpu` argument.

    parallel_state lacks get_model_parallel_{world_size,rank}, which DeepSpeed calls. Deliberately without
    initialize_sequence_parallel / get_sequence_parallel_*: DeepSpeed takes their mere presence to mean
    Ulysses sequence parallelism and then ignores get_data_parallel_group.
    """

    # data parallelism: what ZeRO partitions over and averages gradients across
    def get_data_parallel_group(self):
        return ps.get_data_parallel_group()

    def get_data_parallel_world_size(self) -> int:
        return ps.get_data_parallel_world_size()

    def get_data_parallel_rank(self) -> int:
        return ps.get_data_parallel_rank()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(ps.get_data_parallel_group())

    # model parallelism (TP x PP): where grad norms of sharded weights are summed
    def get_model_parallel_group(self):
        return ps.get_model_parallel_group()

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(ps.get_model_parallel_group())

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(ps.get_model_parallel_group())

    def get_tensor_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return ps.get_tensor_model_parallel_src_rank()

    def get_pipeline_model_parallel_group(self):
        return ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_rank(self) -> int:
        return ps.get_pipeline_model_parallel_rank()


def mup_param_groups(module: torch.nn.Module, config: Config) -> list[dict]:
    """One optimizer group per distinct (lr_mult, wd_mult) of Crystal's muP roles, in a fixed order.

    pp = 1, so the chunk's own parameter names are the global ones that param_kind classifies.
    """
    groups: dict[tuple[float, float], dict] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        kind = param_kind(name, param.dim())
        lr_mult, wd_mult = group_multipliers(config.model, kind)
        group = groups.setdefault((lr_mult, wd_mult), {"params": [], "lr_mult": lr_mult, "wd_mult": wd_mult,
                                                      "kinds": []})
        group["params"].append(param)
        if kind not in group["kinds"]:
            group["kinds"].append(kind)
    for group in groups.values():
        group["name"] = "+".join(group.pop("kinds"))
    return [groups[key] for key in sorted(groups)]


class DeepSpeedEngine:
    """Builds this rank's Crystal model, hands it to deepspeed.initialize and runs training steps."""

    def __init__(self, config: Config, layout: Layout):
        if config.parallel.pp != 1:  # the schema refuses this; the single chunk below relies on it
            raise ValueError("engine: deepspeed needs parallel.pp = 1")
        self.config, self.layout = config, layout
        self.ds_config = build_deepspeed_config(config, layout.dp)  # every ConfigError before any work
        import deepspeed  # after runtime.setup_parallel: distributed/cpu_compat.py's workarounds are installed

        self._deepspeed = deepspeed
        kernels = select_kernels(config.kernels, layout.device.type, precision=config.train.precision)
        if layout.is_main:
            announce(kernels, config.run_dir())
        (self.module,) = build_model_chunks(config.model, config.parallel, config.train.precision, kernels)
        init_crystal_weights([self.module], config.model, config.train.seed)
        self.mpu = MegatronMPU()
        self.engine = self._initialize()

    # -- set-up -------------------------------------------------------------------------------------------
    def _client_optimizer(self) -> torch.optim.Optimizer:
        o, groups = self.config.optim, mup_param_groups(self.module, self.config)
        kwargs = dict(lr=o.lr or 0.0, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        if "offload_optimizer" in offload_devices(self.ds_config):
            # ZeRO-Offload refuses client torch optimizers; DeepSpeed's CPU Adam (a C++ op built at first
            # use) takes the same groups and reads lr / weight_decay per group.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        return torch.optim.AdamW(groups, **kwargs)

    def _initialize(self):
        ds = self._deepspeed
        if self.config.deepspeed.zero_stage == 3:
            # The tied output layer multiplies by the embedding weight, which it gets as an argument from
            # outside its own module; ZeRO-3 must gather it for that forward too. (DeepSpeed also detects
            # such reads on the fly; registering up front does not rely on that.)
            ds.zero.register_external_parameter(self.module.output_layer,
                                                self.module.shared_embedding_or_output_weight())
        engine, _, _, _ = ds.initialize(model=self.module, optimizer=self._client_optimizer(),
                                        config=self.ds_config, mpu=self.mpu)
        return engine

    def reset_optimizer(self) -> None:
        """Fresh optimizer state (a phase that starts from weights only, as Crystal's phase 3).

        The AdamW under ZeRO creates its state lazily at the next step, so dropping it is a fresh start;
        the fp32 master weights and the model are kept.
        """
        self.engine.basic_optimizer.state.clear()

    # -- one step ---------------------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        """Base LR for this step; each muP group scales it by its lr_mult (and weight decay by wd_mult)."""
        for group in self.engine.basic_optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.config.optim.weight_decay * group.get("wd_mult", 1.0)

    def train_step(self, microbatches: list[Microbatch], lr: float) -> StepResult:
        engine = self.engine
        gas = engine.gradient_accumulation_steps()
        if len(microbatches) != gas:
            raise ValueError(f"got {len(microbatches)} micro-batches, DeepSpeed accumulates {gas} per step")
        engine.train()
        self.set_lr(lr)
        tokens = self._dp_sum(sum(mb.loss_mask.double().sum() for mb in microbatches))
        # DeepSpeed divides each micro-batch loss by gas and averages gradients over data-parallel ranks;
        # this factor turns that into d(global sum of token losses) / (global token count).
        scale = gas * engine.dp_world_size / max(float(tokens), 1.0)
        report_norm = not hasattr(engine.optimizer, "_global_grad_norm")  # ZeRO-0 fp32: a bare AdamW
        skipped_before, loss_sum, grad_norm = engine.skipped_steps, torch.zeros((), dtype=torch.float64), None
        for index, mb in enumerate(microbatches):
            summed = self._summed_loss(mb)
            engine.backward(summed * scale)
            loss_sum += summed.detach().double()
            if report_norm and index == gas - 1:  # gradients are all-reduced now, not yet clipped
                grad_norm = self._grad_norm()
            engine.step()
        if grad_norm is None:
            grad_norm = engine.get_global_grad_norm()
        loss = float(self._dp_sum(loss_sum))
        return StepResult(loss=loss / max(float(tokens), 1.0), tokens=int(tokens),
                          grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                          skipped=engine.skipped_steps > skipped_before)

    @torch.no_grad()
    def eval_loss(self, microbatches: list[Microbatch]) -> tuple[float, int]:
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64)
        for mb in microbatches:
            total[0] += self._summed_loss(mb).double()
            total[1] += mb.loss_mask.sum().double()
        total = self._dp_sum(total)
        return float(total[0]), int(total[1])

    # -- checkpoints (hooks for train/checkpointing.py; DeepSpeed's native format) ------------------------
    def save_checkpoint(self, directory) -> None:
        """Every rank writes its model and ZeRO optimizer shards into `directory` (collective)."""
        self.engine.save_checkpoint(str(directory), tag=_CHECKPOINT_TAG, save_latest=False)

    def load_checkpoint(self, directory, optimizer: bool = True) -> None:
        """Load what save_checkpoint wrote (same DP size for the optimizer shards); weights only if not
        `optimizer` (DeepSpeed then refreshes its fp32 master copy from the loaded weights)."""
        path, _ = self.engine.load_checkpoint(str(directory), tag=_CHECKPOINT_TAG, load_optimizer_states=optimizer,
                                              load_lr_scheduler_states=False, load_module_only=not optimizer)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory}")

    # -- internals --------------------------------------------------------------------------------------
    def _summed_loss(self, mb: Microbatch) -> torch.Tensor:
        """Sum of the masked per-token cross entropy of one micro-batch (fp32)."""
        device = self.layout.device
        tokens = mb.tokens.to(device, non_blocking=True)
        positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
        # With labels, GPTModel returns the per-token cross entropy [b, s] (vocab-parallel under TP, the
        # full value on every TP rank).
        per_token = self.engine(tokens, positions, None, labels=mb.labels.to(device, non_blocking=True))
        return torch.sum(per_token.float() * mb.loss_mask.to(device, non_blocking=True).float())

    def _dp_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel group (every TP rank of a DP replica sees the same batch)."""
        tensor = tensor.to(self.layout.device, torch.float64)
        dist.all_reduce(tensor, group=ps.get_data_parallel_group())
        return tensor.cpu()

    def _grad_norm(self) -> float:
        """Global 2-norm of the all-reduced gradients, as DeepSpeed's clipping computes it for ZeRO-0.

        Each data-parallel replica holds the same reduced gradients; across the model-parallel group a
        tensor-parallel shard counts on every rank and a replicated parameter on rank 0 only.
        """
        from deepspeed.runtime.utils import is_model_parallel_parameter

        first = self.mpu.get_model_parallel_rank() == 0
        squares = torch.zeros((), dtype=torch.float64, device=self.layout.device)
        for param in self.engine.module.parameters():
            if param.grad is not None and (first or is_model_parallel_parameter(param)):
                squares += param.grad.detach().double().pow(2).sum()
        dist.all_reduce(squares, group=self.mpu.get_model_parallel_group())
        return float(squares.sqrt())
