"""`mmoe-ds push` at the huggingface_hub boundary, and the export's model card read back.

The Hugging Face Hub cannot be reached from here (no network in CI, and huggingface_hub has no
local fake Hub), so the test double is a subclass of the real `HfApi` whose network methods record
their arguments instead of sending them: what is tested is exactly what crosses into
huggingface_hub. Its endpoint is a closed local port, so a call that is not recorded fails at once.
"""
from __future__ import annotations

import http.server
import json
import os
import secrets
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl, get_token
from huggingface_hub.utils import filter_repo_objects
from test_hub_export import LICENSES, METRICS, make_export
from test_model import tiny_config

from mmoe_ds.export.card import model_card
from mmoe_ds.export.push import IGNORE
from mmoe_ds.export.push import main as push_main

TESTS = Path(__file__).resolve().parent
REPO = "someone/tiny-mmoe"
EXPORT_FILES = {"README.md", "config.json", "generation_config.json", "model.safetensors", "configuration_mmoe.py",
                "modeling_mmoe.py", "moe_config.py", "moe_losses.py", "moe_router.py", "moe_experts.py", "moe_layer.py",
                "vision.py", "processing_mmoe.py", "data_schema.py", "processor_config.json", "tokenizer.json",
                "tokenizer_config.json", "routing_report.md"}


class RecordingHfApi(HfApi):
    """`HfApi` whose network methods record (name, args) instead of calling the Hub."""

    def __init__(self):
        super().__init__(endpoint="http://127.0.0.1:9")
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", dict(kwargs, repo_id=repo_id)))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", dict(kwargs, repo_id=repo_id)))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        files = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
        # what the real upload_folder would send: its listing filtered by huggingface_hub's own filter
        uploaded = sorted(filter_repo_objects(files, allow_patterns=kwargs.get("allow_patterns"),
                                              ignore_patterns=kwargs.get("ignore_patterns")))
        # what the token resolution would give this api (HF_TOKEN or the stored login), not the token
        self.calls.append(("upload_folder", dict(kwargs, files_present=files, uploaded=uploaded,
                                                 token_resolves=get_token() is not None)))
        pr = "https://huggingface.co/someone/tiny-mmoe/discussions/1" if kwargs.get("create_pr") else None
        return CommitInfo(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123",
                          commit_message=kwargs["commit_message"], commit_description="", oid="abc123", pr_url=pr)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    out, _, _ = make_export(tmp_path_factory.mktemp("push"))
    return out


def test_push_creates_the_repo_and_uploads_the_folder_with_the_given_options(export_dir, capsys):
    api = RecordingHfApi()
    assert push_main([str(export_dir), REPO, "--revision", "dev", "--private", "--commit-message", "first model"],
                     api=api) == 0
    assert [name for name, _ in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][1] == {"repo_id": REPO, "repo_type": "model", "private": True, "exist_ok": True}
    assert api.calls[1][1] == {"repo_id": REPO, "branch": "dev", "repo_type": "model", "exist_ok": True}
    upload = api.calls[2][1]
    assert upload["repo_id"] == REPO and upload["folder_path"] == str(export_dir)
    assert (upload["repo_type"], upload["revision"], upload["create_pr"], upload["commit_message"]) == \
        ("model", "dev", False, "first model")
    assert "token" not in upload and "token" not in api.calls[0][1]  # never passed: HfApi resolves it
    assert set(upload["files_present"]) == set(upload["uploaded"]) == EXPORT_FILES
    assert upload["ignore_patterns"] == IGNORE and sorted(upload["allow_patterns"]) == sorted(EXPORT_FILES)
    assert capsys.readouterr().out.strip() == f"pushed {export_dir} -> https://huggingface.co/{REPO}/commit/abc123"


def test_push_as_pull_request_with_defaults(export_dir, capsys):
    api = RecordingHfApi()
    assert push_main([str(export_dir), REPO, "--create-pr"], api=api) == 0
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1]["private"] is None  # an existing repo keeps its visibility
    upload = api.calls[1][1]
    assert (upload["revision"], upload["create_pr"], upload["commit_message"]) == (None, True, "Upload mmoe-ds export")
    assert capsys.readouterr().out.strip().endswith("-> https://huggingface.co/someone/tiny-mmoe/discussions/1")


@pytest.mark.parametrize("remove,words", [
    ("processor_config.json", ["processor_config.json (the processor)", "mmoe-ds export CKPT OUT"]),
    ("model.safetensors", ["model.safetensors or model.safetensors.index.json (the weights)"]),
    ("README.md", ["README.md (the model card)"]),
    ("modeling_mmoe.py", ["modeling_mmoe.py (named by config.json)"]),
    ("processing_mmoe.py", ["processing_mmoe.py (named by processor_config.json)"]),
])
def test_push_refuses_a_folder_that_is_not_an_export(export_dir, tmp_path, capsys, remove, words):
    folder = tmp_path / "almost"
    folder.mkdir()
    for f in export_dir.iterdir():
        if f.name != remove:
            (folder / f.name).write_bytes(f.read_bytes())
    api = RecordingHfApi()
    assert push_main([str(folder), REPO], api=api) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mmoe-ds push: ") and "is not an mmoe-ds export" in err
    for w in words:
        assert w in err
    assert api.calls == []  # nothing reached the Hub
    assert push_main([str(tmp_path / "nowhere"), REPO], api=api) == 2 and api.calls == []
    assert "no such folder" in capsys.readouterr().err


def test_card_metadata_reads_back_with_the_checkpoint_metrics(export_dir):
    card = ModelCard.load(export_dir / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-text-to-text"
    assert {"mixture-of-experts", "multimodal", "custom_code"} <= set(data.tags)
    assert data.license == "apache-2.0" and data.datasets == ["digits", "fashion_mnist", "wordnet"]
    assert data.language == ["en"]
    results = {r.metric_type: r.metric_value for r in data.eval_results}
    assert results == {"caption_loss": 1.25, "text_ppl": 40.5, "retrieval_r1": 0.35, "retrieval_r5": 0.8,
                       "caption_rank_acc": 0.6}
    assert all(results[k] == METRICS[k] for k in results)
    splits = {r.metric_type: r.dataset_split for r in data.eval_results}
    assert splits == {"caption_loss": "validation", "text_ppl": "validation", "retrieval_r1": "test",
                      "retrieval_r5": "test", "caption_rank_acc": "test"}
    # each source's license, as its shard's samples record it
    for source, lic in LICENSES.items():
        assert f"| {source} | {lic} |" in card.text, source
    body = card.text
    assert "trust_remote_code=True" in body
    assert "pip install torch transformers Pillow tokenizers safetensors numpy" in body
    assert "| image | 1 | 1.25 | 2 | 0, 1, 2 |" in body and "| text | 2 | 1.25 | 2 | 2, 3 |" in body
    # the audit of the last train record (step 20), by hand: image kept 6+2+5+5 = 18 of 20 routes, text
    # 10+10+20 = 40 of 40; compute share 18/58 and 40/58; effective experts mean(exp(H(.75,.25)), 2) = 1.877
    # and mean(2, 1) = 1.5; router exp(0.5) = 1.65 and exp(ln 2) = 2
    assert "training-time routing statistics" in body and "step 20" in body
    assert "| image | 20 | 50.0% | 31.0% | 10.00% | 1.88 | 1.65 |" in body
    assert "| text | 20 | 50.0% | 69.0% | 0.00% | 1.50 | 2.00 |" in body
    assert "[routing_report.md](routing_report.md)" in body


def test_token_from_the_environment_appears_in_no_output_and_no_file(export_dir, tmp_path):
    token = "hf_test" + secrets.token_hex(16)
    env = dict(os.environ, HF_TOKEN=token, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    dry = subprocess.run([sys.executable, "-m", "mmoe_ds.export.push", str(export_dir), REPO, "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    script = ("from test_push import RecordingHfApi\nfrom mmoe_ds.export.push import main\napi = RecordingHfApi()\n"
              f"assert main([{str(export_dir)!r}, {REPO!r}, '--private'], api=api) == 0\n"
              "upload = api.calls[-1][1]\nassert upload['token_resolves'] and 'token' not in upload, upload\n"
              "print(api.calls)\n")
    real = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert real.returncode == 0, real.stderr[-3000:]
    for output in (dry.stdout, dry.stderr, real.stdout, real.stderr):
        assert token not in output and token[2:] not in output
    for f in [*export_dir.rglob("*"), *tmp_path.rglob("*")]:
        if f.is_file():
            assert token.encode() not in f.read_bytes(), f
    # --dry-run lists exactly the export's files with their sizes, then the card
    listed = [line.split() for line in dry.stdout.split("\n\nmodel card (README.md):\n")[0].splitlines()[1:]]
    assert {name: int(size) for size, name in listed} == {n: (export_dir / n).stat().st_size for n in EXPORT_FILES}
    assert dry.stdout.endswith((export_dir / "README.md").read_text() + "\n")


class RefusingHub(http.server.BaseHTTPRequestHandler):
    """A local stand-in for the Hub's HTTP API that refuses every request with 401, recording what it got."""

    seen: list[tuple[str, str, str]] = []

    def _refuse(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        RefusingHub.seen.append((self.command, self.path, self.headers.get("Authorization", "")))
        body = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _refuse

    def log_message(self, *args):
        pass


def test_cli_push_over_real_http_sends_the_token_only_as_a_header_and_fails_in_one_line(export_dir, tmp_path):
    token = "hf_test" + secrets.token_hex(16)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RefusingHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    RefusingHub.seen = []
    try:
        env = dict(os.environ, HF_TOKEN=token, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf_home"),
                   HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}")
        proc = subprocess.run([sys.executable, "-m", "mmoe_ds.export.push", str(export_dir), REPO], env=env,
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("mmoe-ds push: the Hub refused or could not be reached (HfHubHTTPError: "
                                  "Client error '401 Unauthorized'"), proc.stderr
    assert token not in proc.stdout + proc.stderr
    # from HF_TOKEN, sent only as the Authorization header (huggingface_hub also makes unauthenticated
    # GETs of its own, e.g. /api/agent-harnesses, in 2.4)
    assert ("POST", "/api/repos/create", f"Bearer {token}") in RefusingHub.seen, RefusingHub.seen
    assert all(auth in ("", f"Bearer {token}") and token not in path for _, path, auth in RefusingHub.seen)


def polluted_copy(export_dir: Path, folder: Path) -> Path:
    """The export plus what a messy training folder leaves around (issue 18, item 9)."""
    folder.mkdir()
    for f in export_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / ".env").write_text("HF_TOKEN=hf_not_a_real_token\n")
    (folder / "optimizer.pt").write_bytes(b"\x80\x04pickle")
    (folder / "training_args.bin").write_bytes(b"\x80\x04pickle")
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints" / "config-checkpoint.json").write_text("{}")
    (folder / ".ipynb_checkpoints" / "config.json").write_text("{}")
    (folder / "events.out.tfevents.1700000000.host.1.0").write_bytes(b"\x00" * 16)
    (folder / "runs").mkdir()
    (folder / "runs" / "events.out.tfevents.1700000001.host.2.0").write_bytes(b"\x00" * 16)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    (folder / "notes.py").write_text("import os\n")
    return folder


def test_push_uploads_only_the_export_from_a_polluted_folder_and_refuses_an_outside_link(export_dir, tmp_path,
                                                                                        capsys):
    folder = polluted_copy(export_dir, tmp_path / "messy")
    (folder / "hostname").symlink_to("/etc/hostname")
    api = RecordingHfApi()
    for argv in ([str(folder), REPO, "--dry-run"], [str(folder), REPO]):
        assert push_main(argv, api=api) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"mmoe-ds push: {folder / 'hostname'} is a symbolic link to "
                                                       f"{os.path.realpath('/etc/hostname')}, outside the export"), err
    assert api.calls == []  # refused before anything reached the Hub
    (folder / "hostname").unlink()
    (folder / "card_link.md").symlink_to(folder / "README.md")  # a link inside the folder is no reason to refuse
    assert push_main([str(folder), REPO, "--dry-run"], api=api) == 0
    out = capsys.readouterr().out
    listing = out.split("\n\nmodel card (README.md):\n")[0]
    listed = {line.split()[1] for line in listing.splitlines()[1:] if line.startswith("  ")}
    assert listed == EXPORT_FILES, listed ^ EXPORT_FILES
    for name in (".env", "optimizer.pt", "training_args.bin", ".ipynb_checkpoints", "tfevents", "pytorch_model.bin",
                 "notes.py", "runs/", "card_link.md"):
        assert name not in listing, name
    assert "(9 other entries of the folder are not part of an export and stay local)" in listing
    assert push_main([str(folder), REPO], api=api) == 0
    upload = api.calls[-1][1]
    assert set(upload["uploaded"]) == EXPORT_FILES and ".env" in upload["files_present"]


def test_card_audit_counts_drops_per_route_not_per_token():
    """Top-2 text with drops: 10 tokens make 20 routes, 6 dropped -> 30% of routes (per token it would read
    60%); top-1 image: 10 tokens, 10 routes, 2 dropped -> 20% either way."""
    record = {"kind": "train", "step": 7, "routing": [
        {"image": {"tokens": 10, "routed_per_expert": [6, 4, 0, 0], "kept_per_expert": [4, 4, 0, 0], "dropped": 2,
                   "entropy": 0.5},
         "text": {"tokens": 10, "routed_per_expert": [0, 0, 10, 10], "kept_per_expert": [0, 0, 10, 4], "dropped": 6,
                  "entropy": 0.5}}]}
    card = ModelCard(str(model_card({}, tiny_config(), None, record)))
    assert card.data.pipeline_tag == "image-text-to-text" and card.data.language == ["en"]
    # kept 8 of image's 10 routes and 14 of text's 20: compute shares 8/22 and 14/22
    assert "| image | 10 | 50.0% | 36.4% | 20.00% |" in card.text
    assert "| text | 10 | 50.0% | 63.6% | 30.00% |" in card.text
