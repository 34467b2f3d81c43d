#!/usr/bin/env bash
# A smoke check on 2 GPUs (nccl) of what the CPU tests cannot reach: every mode trains, a run resumes, an MoE model
# trains with its router loss under the tiled MLP and chunked loss, and bad labels stop every rank. Run from the
# repository root: `bash benchmarks/gpu_smoke.sh` (logs go to $OUT when set, else ./gpu_smoke_logs).
OUT=${OUT:-gpu_smoke_logs}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
python -c "import torch,transformers,accelerate;print('versions',torch.__version__,transformers.__version__,accelerate.__version__)"
python -c "import transformers as t;c=t.MixtralConfig(vocab_size=128,hidden_size=128,intermediate_size=256,num_hidden_layers=2,num_attention_heads=8,num_key_value_heads=2,num_local_experts=4,output_router_logits=True,router_aux_loss_coef=0.02,max_position_embeddings=4096);c.save_pretrained('/tmp/mix')"
python - <<'PY'
import json
rows=[{"input_ids":list(range(1,60)),"labels":list(range(1,60))} for _ in range(24)]
rows[5]["labels"][-1]=100000
open("/tmp/bad.jsonl","w").write("".join(json.dumps(r)+"\n" for r in rows))
PY
run(){ local t0=$(date +%s); timeout 300 torchrun --nproc_per_node 2 examples/train.py --bf16 --max_steps 8 --logging_steps 2 --log_level info "$@" > /tmp/log 2>&1; local rc=$?; echo "== rc=$rc $(( $(date +%s)-t0 ))s: $*"; grep -E "Context parallelism|'loss'|Error|error|Traceback" /tmp/log | cut -c1-400 | tail -8; cp /tmp/log "$OUT/log_$(echo "$*" | tr -c 'a-z0-9' '_' | cut -c1-60).txt"; }
for m in zigzag ulysses llama3 hybrid odysseus; do run --output_dir /tmp/o_$m --context_parallel_mode $m; done
run --output_dir /tmp/o_zigzag --context_parallel_mode zigzag --max_steps 12 --resume_from_checkpoint last
run --output_dir /tmp/o_moe --model /tmp/mix/config.json --context_parallel_mode zigzag --context_parallel_mlp_tile_size 64 --context_parallel_loss_chunk_size 256
run --output_dir /tmp/o_moe_u --model /tmp/mix/config.json --context_parallel_mode ulysses --gradient_checkpointing
run --output_dir /tmp/o_bad --data /tmp/bad.jsonl --per_device_train_batch_size 4
echo "labels-range errors in the bad run (one per rank expected): $(grep -c 'labels range from' /tmp/log)"
