"""The megatron-core engine: DDP (or the distributed optimizer), 1F1B / interleaved pipeline schedules."""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..config import Config
from ..distributed import shm_reduce
from ..distributed.grad_buffer import write_first_gradients
from ..distributed.runtime import Layout
from ..kernels.select import announce, select_kernels
from ..kernels.spec import use_adam
from ..model.crystal import build_model_chunks
from ..model.init import init_crystal_weights
from ..model.param_groups import megatron_group_overrides
from .base import Microbatch, StepResult


class MegatronEngine:
    """Builds this rank's Crystal chunks, wraps them in megatron DDP and runs training steps."""

    def __init__(self, config: Config, layout: Layout):
        self.config, self.layout = config, layout
        self.kernels = select_kernels(config.kernels, layout.device.type, precision=config.train.precision)
        if layout.is_main:
            announce(self.kernels, config.run_dir())
        chunks = build_model_chunks(config.model, config.parallel, config.train.precision, self.kernels)
        init_crystal_weights(chunks, config.model, config.train.seed)
        if config.train.compile:
            for chunk in chunks:
                chunk.compile_layers_and_loss()
        if layout.device.type == "cuda":  # built on the CPU (layout-independent init), trained on the GPU
            chunks = [chunk.cuda(layout.device) for chunk in chunks]
        self.tconfig = chunks[0].config
        dp_group = ps.get_data_parallel_group(with_context_parallel=True)
        grad_bytes = 4 * sum(p.numel() for chunk in chunks for p in chunk.parameters() if p.requires_grad)
        self.shared_memory_grad_reduce = (
            config.parallel.shared_memory_grad_reduce and layout.device.type == "cpu" and layout.dp > 1
            and not config.parallel.distributed_optimizer and shm_reduce.usable(dp_group, grad_bytes))
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=config.parallel.distributed_optimizer,
            overlap_grad_reduce=config.parallel.overlap_grad_reduce and not self.shared_memory_grad_reduce,
            bucket_size=config.parallel.grad_bucket_size,
            average_in_collective=False,  # required with per-token loss: grads are summed, then / tokens
        )
        self.model = [
            DistributedDataParallel(config=self.tconfig, ddp_config=ddp_config, module=chunk,
                                    disable_bucketing=index > 0)
            for index, chunk in enumerate(chunks)
        ]
        for chunk in self.model:
            if self.shared_memory_grad_reduce:
                shm_reduce.reduce_through_shared_memory(chunk, dp_group)
            write_first_gradients(chunk)
        no_sync = [m.no_sync for m in self.model]
        self.tconfig.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]
        self.tconfig.finalize_model_grads_func = self._finalize_model_grads
        self.optimizer = self._build_optimizer()
        self._forward_backward = get_forward_backward_func()

    def _build_optimizer(self):
        config = self.config
        o = config.optim
        use_adam(self.kernels)
        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",  # megatron's Adam with decoupled weight decay (AdamW)
                lr=o.lr or 0.0,  # set per step by set_lr
                min_lr=0.0,
                weight_decay=o.weight_decay,
                adam_beta1=o.betas[0],
                adam_beta2=o.betas[1],
                adam_eps=o.eps,
                clip_grad=o.clip_grad,
                bf16=config.train.precision == "bf16",
                params_dtype=self.tconfig.params_dtype,
                use_distributed_optimizer=config.parallel.distributed_optimizer,
            ),
            self.model,
            config_overrides=megatron_group_overrides(config.model),
        )
        if config.train.precision == "bf16":
            self.tconfig.grad_scale_func = optimizer.scale_loss
        # Without Apex/Transformer Engine megatron falls back to torch's AdamW with its default per-parameter
        # loop; torch's fused kernel does the same update several times faster (CPU and GPU).
        for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
            torch_adamw = getattr(inner, "optimizer", None)
            if isinstance(torch_adamw, torch.optim.AdamW):
                for group in torch_adamw.param_groups:
                    group["fused"], group["foreach"] = True, False
        return optimizer

    def reset_optimizer(self) -> None:
        """Fresh optimizer state (a phase that starts from weights only, as Crystal's phase 3)."""
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer = self._build_optimizer()

    # -- one step ---------------------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        """Base LR for this step; each muP group scales it by its lr_mult (and weight decay by wd_mult)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.config.optim.weight_decay * group.get("wd_mult", 1.0)

    def train_step(self, microbatches: list[Microbatch], lr: float) -> StepResult:
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.set_lr(lr)
        reduced = self._run(microbatches, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        loss_sum, tokens = self._global_loss(reduced)
        return StepResult(loss=loss_sum / max(tokens, 1), tokens=tokens,
                          grad_norm=float(grad_norm) if grad_norm is not None else float("nan"), skipped=not ok,
                          row_losses=self._global_rows(reduced, sum(len(mb.tokens) for mb in microbatches)))

    @torch.no_grad()
    def eval_loss(self, microbatches: list[Microbatch]) -> tuple[float, int]:
        for chunk in self.model:
            chunk.eval()
        return self._global_loss(self._run(microbatches, forward_only=True))

    # -- checkpoints ------------------------------------------------------------------------------------
    def save_checkpoint(self, directory) -> None:
        """Write this rank's model and optimizer shards into `directory` (collective)."""
        from ..checkpoint import megatron as megatron_checkpoint

        megatron_checkpoint.save(self, directory)

    def load_checkpoint(self, directory, optimizer: bool = True) -> None:
        """Load model (and optimizer) state, resharding to this run's layout (collective)."""
        from ..checkpoint import megatron as megatron_checkpoint

        megatron_checkpoint.load(self, directory, optimizer=optimizer)

    # -- internals --------------------------------------------------------------------------------------
    def _run(self, microbatches: list[Microbatch], forward_only: bool) -> list[dict]:
        tokens = microbatches[0].tokens
        iterators = [iter(microbatches) for _ in self.model]
        return self._forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.model,
            num_microbatches=len(microbatches),
            seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0],
            forward_only=forward_only,
        )

    def _forward_step(self, data_iterator, model):
        batch: Microbatch = next(data_iterator)
        device = self.layout.device
        tokens = batch.tokens.to(device, non_blocking=True)
        positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
        # With labels, GPTModel returns the per-token cross entropy [b, s] (vocab-parallel under TP).
        output = model(tokens, positions, None, labels=batch.labels.to(device, non_blocking=True))
        return output, partial(_sum_loss, batch.loss_mask.to(device, non_blocking=True))

    def _finalize_model_grads(self, *args, **kwargs):
        """megatron's gradient reductions, after zeroing the gradients no backward wrote this step."""
        for chunk in self.model:
            chunk.zero_stale_gradients()
        return finalize_model_grads(*args, **kwargs)

    def _global_loss(self, reduced: list[dict]) -> tuple[float, int]:
        """Sum (loss, tokens) over micro-batches and data-parallel ranks; every rank gets the result."""
        total = torch.zeros(2, dtype=torch.float64, device=self.layout.device)
        if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
            for item in reduced:
                total += item["lm loss"].to(total)
        dist.all_reduce(total)
        return float(total[0]), int(total[1])

    def _global_rows(self, reduced: list[dict], rows_per_rank: int) -> torch.Tensor:
        """[B, 2] (loss sum, tokens) of every row of the global batch; each row is written by one rank only,
        so the sum over ranks is exact and the same at every layout."""
        dp, dp_rank = self.layout.dp, self.layout.dp_rank
        total = torch.zeros(rows_per_rank * dp, 2, dtype=torch.float64, device=self.layout.device)
        if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0 and reduced:
            mine = torch.cat([item["row loss"] for item in reduced]).to(total)
            total[dp_rank * rows_per_rank:(dp_rank + 1) * rows_per_rank] = mine
        dist.all_reduce(total)
        return total.cpu()


def _sum_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Summed masked loss and its token count; megatron divides gradients by the global token count."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(per_token_loss.float().reshape(-1) * mask)
    count = mask.sum()
    # Per row as well (rows know their dataset): the per-dataset training loss sums these.
    rows = (per_token_loss.detach().double().reshape(loss_mask.shape) * loss_mask.double()).sum(dim=1)
    row_loss = torch.stack([rows, loss_mask.double().sum(dim=1)], dim=1)
    return loss_sum, count.to(torch.int), {"lm loss": torch.stack([loss_sum.detach().clone(), count]),
                                           "row loss": row_loss}
