"""What HF users do to an export, in a process where neither mmoe_ds nor DeepSpeed can be imported:
LoRA with peft on the experts and the router (the experts are 3-D parameters, w13 [E, 2f, d] and
w2 [E, d, f], reached with `target_parameters`; the router's `wg` is a Linear, reached with
`target_modules`; both modules are called, so the adapters run, train, save, reload and merge), and
accelerate's disk offload (`device_map="auto"` under a memory cap: each weight is brought in only
when its module is called)."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch
from PIL import Image
from test_hub_export import make_export, run_blocked
from test_model import LLAMA_STYLE, tiny_config

from mmoe_ds.export import save_export
from mmoe_ds.model import MmoeForCausalLM


def training_batch(processor, path: Path) -> None:
    """A right-padded training batch with labels and images (the processor's training call), saved for the child."""
    images = [Image.new("L", (28, 28), 255), Image.radial_gradient("L").resize((28, 28))]
    batch = processor(images=images, texts=["an ankle boot", "a pair of trousers"])
    torch.save(dict(batch), path)


EXPERTS = ["deepspeed_moe.experts.w13", "deepspeed_moe.experts.w2"]  # what the README tells users to target
PEFT_SCRIPT = """
import json, torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

R = 4
batch = torch.load("batch.pt")
def load():
    return AutoModelForCausalLM.from_pretrained("export", trust_remote_code=True).eval()
def logits(model):
    with torch.no_grad():
        return model(**batch).logits
def gap(a, b):  # inf where the shapes differ (a router's LoRA can change how many routes a layer keeps)
    return float((a.detach() - b.detach()).abs().max()) if a.shape == b.shape else float("inf")
def experts_io(model):
    # (input rows, output) of each MoE layer's experts module in one forward, in layer order
    seen, hooks = [], []
    for name, module in model.named_modules():
        if name.endswith("deepspeed_moe.experts"):
            hooks.append(module.register_forward_hook(lambda m, args, out: seen.append((args[0], out))))
    logits(model)
    for h in hooks:
        h.remove()
    return seen

CASES = {  # name: (target_modules, target_parameters)
    "experts_router": (["wg"], EXPERTS),
    "experts_only": (None, EXPERTS),
    "all_linear": ("all-linear", None),
    "all_linear_experts": ("all-linear", EXPERTS),
}
result = {}
for name, (modules, parameters) in CASES.items():
    torch.manual_seed(0)
    base = load()
    experts = base.config.num_local_experts
    plain = logits(base)
    # init_lora_weights=False: B random as well, so the adapters change the function from the start
    model = get_peft_model(base, LoraConfig(r=R, lora_alpha=8, target_modules=modules, target_parameters=parameters,
                                            init_lora_weights=False))
    on, io_on = logits(model), experts_io(model)
    with model.disable_adapter():
        off, io_off = logits(model), experts_io(model)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    good = {n: g is not None and bool(torch.isfinite(g).all()) and bool(g.abs().sum() > 0) for n, g in grads.items()}
    # one expert LoRA holds every expert: A [E*r, in] (expert e: rows e*r..), B [out, r*E] (expert e: columns e::E)
    idle = []
    for n, p in model.named_parameters():
        if "deepspeed_moe.experts." in n and p.grad is not None:
            per_expert = (p.grad.reshape(experts, R, -1).abs().sum((1, 2)) if "lora_A" in n
                          else p.grad.reshape(p.shape[0], R, experts).abs().sum((0, 1)))
            idle += [f"{n}[expert {e}]" for e in range(experts) if not float(per_expert[e]) > 0]
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    model.eval()
    trained = logits(model)
    model.save_pretrained("adapter_" + name)
    reloaded = PeftModel.from_pretrained(load(), "adapter_" + name).eval()
    again = logits(reloaded)
    merged = reloaded.merge_and_unload()
    wrapped = [n for n, m in merged.named_modules() if "lora" in type(m).__module__]
    result[name] = {
        "loss": float(loss.detach()), "on_vs_off": gap(on, off), "off_vs_plain": gap(off, plain),
        "lora_B": len(grads), "bad_grads": [n for n, ok in good.items() if not ok],
        "expert_lora_B": sum("deepspeed_moe.experts." in n for n in grads),
        "router_lora_B": sum(".gate.wg." in n for n in grads), "experts_without_grad": idle,
        "first_experts_input_gap": gap(io_on[0][0], io_off[0][0]),
        "first_experts_output_gap": gap(io_on[0][1], io_off[0][1]),
        "step_moved": gap(trained, on), "reload_gap": gap(again, trained), "merged_gap": gap(logits(merged), again),
        "wrapped_after_merge": wrapped,
    }
print(json.dumps(result))
"""


def test_peft_lora_on_experts_and_router_changes_trains_saves_reloads_and_merges(tmp_path):
    export_dir, model, processor = make_export(tmp_path, seed=3)
    training_batch(processor, tmp_path / "batch.pt")
    proc = run_blocked(PEFT_SCRIPT.replace("EXPERTS", repr(EXPERTS)), tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    moe_layers = sum(layer.is_moe for layer in model.model.layers)
    # one LoRA per 3-D expert weight (w13, w2) of each MoE layer, holding every expert's low-rank pair;
    # "all-linear" wraps nn.Linear modules only, and the experts are parameters, not Linears: without
    # target_parameters it leaves them untouched (the router's wg, a Linear, it does wrap)
    expert_loras = {"experts_router": 2 * moe_layers, "experts_only": 2 * moe_layers, "all_linear": 0,
                    "all_linear_experts": 2 * moe_layers}
    router_loras = dict.fromkeys(expert_loras, moe_layers) | {"experts_only": 0}
    assert sorted(result) == sorted(expert_loras)
    for name, r in result.items():
        assert r["off_vs_plain"] == 0.0, (name, r)  # adapters off: the exported model exactly
        assert r["on_vs_off"] > 1e-3, (name, r)  # adapters on: they run
        assert r["bad_grads"] == [], (name, r)  # every lora_B: a finite, non-zero gradient
        assert r["expert_lora_B"] == expert_loras[name] and r["router_lora_B"] == router_loras[name], (name, r)
        assert r["experts_without_grad"] == [], (name, r)  # every expert's own A and B rows get a gradient
        assert r["step_moved"] > 1e-4 and r["reload_gap"] <= 1e-6, (name, r)
        assert r["merged_gap"] <= 1e-5 and r["wrapped_after_merge"] == [], (name, r)
    # the experts' LoRA changes what the experts compute, not only the routing: with the router and
    # everything before the first MoE layer untouched, its experts see the same rows and return others
    only = result["experts_only"]
    assert only["first_experts_input_gap"] == 0.0 and only["first_experts_output_gap"] > 1e-3, only
    # all-linear wraps attention, the dense FFN, the patch embedding and head besides the router; with
    # target_parameters it adds exactly the experts' LoRAs
    assert result["all_linear"]["lora_B"] > result["all_linear"]["router_lora_B"]
    assert result["all_linear_experts"]["lora_B"] == result["all_linear"]["lora_B"] + 2 * moe_layers


OFFLOAD_SCRIPT = """
import json, torch
from transformers import AutoModelForCausalLM

result = {}
for name, cap in CAPS.items():
    batch, prompt = torch.load(name + "_batch.pt"), torch.load(name + "_prompt.pt")
    plain = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=True).eval()
    offloaded = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=True, device_map="auto",
                                                     max_memory={"cpu": cap}, offload_folder=name + "_offload").eval()
    greedy = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        a, b = plain(**batch).logits, offloaded(**batch).logits
        ga, gb = plain.generate(**prompt, **greedy), offloaded.generate(**prompt, **greedy)
    result[name] = {"devices": sorted(set(map(str, offloaded.hf_device_map.values()))),
                    "disk_modules": sorted(k for k, v in offloaded.hf_device_map.items() if v == "disk"),
                    "logits_gap": float((a - b).abs().max()), "same_generation": bool(torch.equal(ga, gb))}
print(json.dumps(result))
"""


def weights_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def save_inputs(processor, folder: Path, name: str) -> None:
    """`name`_batch.pt: a training batch (labels, images); `name`_prompt.pt: an image-only caption prompt."""
    training_batch(processor, folder / f"{name}_batch.pt")
    torch.save(dict(processor(images=[Image.new("L", (28, 28), 128)], text="a", return_tensors="pt")),
               folder / f"{name}_prompt.pt")


def test_accelerate_disk_offload_gives_the_plain_loads_logits(tmp_path):
    from test_vision_tower import model_config, save_vision_model

    from mmoe_ds.data.pretrained_processor import PretrainedProcessor
    from mmoe_ds.model.vision import load_tower_weights, vision_config_from_pretrained

    export_dir, model, processor = make_export(tmp_path, seed=4)  # learned positions, masked pools
    save_inputs(processor, tmp_path, "export")
    models = {"export": model}
    torch.manual_seed(5)  # rotary, grouped-query attention, tied embeddings, a router with its own parameter
    models["rope"] = MmoeForCausalLM(tiny_config(**LLAMA_STYLE, vocab_size=model.config.vocab_size,
                                                 router={"mode": "modality_bias"}, modality_bias_init_std=0.5)).eval()
    save_export(models["rope"], tmp_path / "rope", processor_dir=tmp_path / "data" / "processor")
    save_inputs(processor, tmp_path, "rope")
    save_vision_model(tmp_path / "siglip_vision", "siglip")  # an HF vision tower (its encoder read by accelerate too)
    config = model_config(vision_config_from_pretrained(tmp_path / "siglip_vision"), processor.tokenizer)
    torch.manual_seed(6)
    models["tower"] = MmoeForCausalLM(config).eval()
    load_tower_weights(models["tower"].model.vision, tmp_path / "siglip_vision")
    tower_processor = PretrainedProcessor.from_components(processor.tokenizer, tmp_path / "siglip_vision", config)
    tower_processor.save_pretrained(tmp_path / "tower_processor")
    save_export(models["tower"], tmp_path / "tower", processor_dir=tmp_path / "tower_processor")
    save_inputs(tower_processor, tmp_path, "tower")
    # a CPU cap of 80% of the weights (the 3MB for the demo export): the rest goes to disk
    caps = {name: f"{weights_bytes(m) * 4 // 5 // 1000}KB" for name, m in models.items()}
    proc = run_blocked(textwrap.dedent(OFFLOAD_SCRIPT).replace("CAPS", repr(caps)), tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(result) == sorted(models)
    for name, r in result.items():
        assert r["devices"] == ["cpu", "disk"], (name, r)  # really split between memory and the offload folder
        assert any(m.startswith("model.layers") for m in r["disk_modules"]), (name, r)
        # an MoE layer's experts (their 3-D w13 / w2) are among what is on disk: the experts module's own
        # call is what brings them in
        experts = [f"model.layers.{i}.ffn.deepspeed_moe.experts" for i, layer in enumerate(models[name].model.layers)
                   if layer.is_moe]
        assert any(e == m or e.startswith(m + ".") for e in experts for m in r["disk_modules"]), (name, r)
        assert r["logits_gap"] == 0.0 and r["same_generation"], (name, r)
