# GPU image for training: CUDA torch from the base image, the rest pinned.
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-devel
WORKDIR /workspace/mmoe-ds
COPY pyproject.toml README.md ./
COPY requirements ./requirements
COPY mmoe_ds ./mmoe_ds
RUN pip install --no-cache-dir -c requirements/constraints.txt -e ".[train]"
COPY recipes ./recipes
COPY ds_configs ./ds_configs
COPY launch ./launch
ENV OMP_NUM_THREADS=8 TOKENIZERS_PARALLELISM=false
CMD ["deepspeed", "--num_gpus", "8", "--module", "mmoe_ds.train", "--recipe", "recipes/gpu_node.json", "--deepspeed_config", "ds_configs/zero1_bf16.json"]
