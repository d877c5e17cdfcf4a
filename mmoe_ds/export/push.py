"""`mmoe-ds push EXPORT_DIR REPO_ID`: upload an export (from `mmoe-ds export`) to the Hugging Face Hub.

The token comes only from the `HF_TOKEN` environment variable or huggingface_hub's stored login
(`hf auth login`), resolved by `HfApi` itself: it is never an argument, never printed or logged,
and never written anywhere. `--dry-run` prints the files and the card that would go up, offline.

Only what an export contains goes up, by an allow-list of names at the folder's top level (config,
weights and their index, processor and tokenizer files, the shipped code, card, routing report):
whatever else lies in the folder (`.env`, `optimizer.pt`, `training_args.bin` pickles, dot-folders
such as `.ipynb_checkpoints/`, TensorBoard event files, sub-folders) is never uploaded, and a
symbolic link that leaves the folder is refused before anything is sent.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import NotAnExport

REQUIRED = {"config.json": "the model config", "README.md": "the model card",
            "processor_config.json": "the processor"}
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
# What an export holds (top level only): what `mmoe-ds export` writes, and the tokenizer files
# transformers may write for a pretrained LM's tokenizer (`mmoe-ds upcycle`). The shipped code's
# names come from mmoe_ds.export.remote_code; weight shards match SHARD_NAME.
EXPORT_FILES = ("config.json", "generation_config.json", "README.md", "model.safetensors",
                "model.safetensors.index.json", "processor_config.json", "preprocessor_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                "vocab.json", "merges.txt", "tokenizer.model", "routing_report.md", "routing_report.png")
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# never uploaded even if a future allow-list entry matched (fnmatch patterns, as upload_folder applies them)
IGNORE = [".*", "*/.*", "__pycache__/*", "*/__pycache__/*", "*.pyc", "*.pt", "*.bin", "*.pth", "*.pkl", "*.ckpt",
          "*tfevents*"]



@dataclass
class PushPlan:
    """What `push` uploads: the files (relative path, bytes) and the card's text."""

    export_dir: Path
    repo_id: str
    files: list[tuple[str, int]] = field(default_factory=list)
    card: str = ""
    left_out: int = 0  # entries of the folder that are not part of an export (never uploaded)

    @property
    def names(self) -> list[str]:
        """The paths to upload, relative to the export folder."""
        return [name for name, _ in self.files]

    def describe(self) -> str:
        """What `--dry-run` prints: every file with its size, then the model card."""
        total = sum(size for _, size in self.files)
        lines = [f"would upload {len(self.files)} files ({total} bytes) from {self.export_dir} to {self.repo_id}:"]
        lines += [f"  {size:>12}  {name}" for name, size in self.files]
        if self.left_out:
            lines.append(f"({self.left_out} other entries of the folder are not part of an export and stay local)")
        return "\n".join(lines + ["", "model card (README.md):", self.card])


@dataclass
class PushResult:
    """Where the upload went: the repository, the commit, and the pull request when one was opened."""

    repo_url: str
    commit_url: str
    pr_url: str | None


def plan_push(export_dir: str | Path, repo_id: str) -> PushPlan:
    """Check the folder is an export and list what would go up.

    Args:
        export_dir: a folder written by `mmoe-ds export`.
        repo_id: "user/name" or "org/name".
    Returns:
        the plan. Raises NotAnExport (one line, naming the fix) for anything else."""
    root = Path(export_dir)
    if not root.is_dir():
        raise NotAnExport(f"{root}: no such folder; pass the folder written by `mmoe-ds export CKPT OUT`.")
    missing = [f"{name} ({what})" for name, what in REQUIRED.items() if not (root / name).is_file()]
    if not any((root / w).is_file() for w in WEIGHTS):
        missing.append("model.safetensors or model.safetensors.index.json (the weights)")
    missing += [f"{name} (named by {source})" for source, name in _referenced_files(root)
                if not (root / name).is_file()]
    if missing:
        raise NotAnExport(f"{root} is not an mmoe-ds export: missing {', '.join(missing)}; write it with "
                          "`mmoe-ds export CKPT OUT` (from a run whose data has a processor).")
    if repo_id.count("/") > 1 or not repo_id.strip("/") or " " in repo_id:
        raise NotAnExport(f"repo id {repo_id!r} is not of the form 'user/name' or 'org/name'.")
    allowed = export_names(root)
    entries = sorted(os.listdir(root))
    for name in entries:  # before anything is listed or sent: a link may not lead out of the folder
        link = root / name
        if link.is_symlink() and root.resolve() not in link.resolve().parents:
            raise NotAnExport(f"{link} is a symbolic link to {os.path.realpath(link)}, outside the export; "
                              "remove it (or copy the file in) before pushing.")
    from huggingface_hub.utils import filter_repo_objects  # the filter upload_folder applies

    names = list(filter_repo_objects([n for n in entries if n in allowed and (root / n).is_file()],
                                     ignore_patterns=IGNORE))
    return PushPlan(root, repo_id, [(n, (root / n).stat().st_size) for n in names], (root / "README.md").read_text(),
                    left_out=len(entries) - len(names))


def export_names(root: Path) -> set[str]:
    """The file names an export may hold at its top level: EXPORT_FILES, weight shards (SHARD_NAME, or
    named by the index), and the shipped code (mmoe_ds.export.remote_code's files and the auto_maps' modules)."""
    from .remote_code import CODE_FILES, OPTIONAL_CODE_FILES, PROCESSOR_CODE_FILES, PROCESSOR_DEPENDENCIES

    names = set(EXPORT_FILES) | {n for n in os.listdir(root) if SHARD_NAME.fullmatch(n)}
    names |= {*CODE_FILES.values(), *OPTIONAL_CODE_FILES.values(), *PROCESSOR_CODE_FILES.values(),
              *PROCESSOR_DEPENDENCIES.values()}
    names |= {ref for _, ref in _referenced_files(root)
              if "/" not in ref and ref.endswith((".safetensors", ".py")) and not ref.startswith(".")}
    return names


def _referenced_files(root: Path) -> list[tuple[str, str]]:
    """(referring file, file) for the weight shards of the index and the code files of the auto_maps."""
    refs = []
    for source in ("model.safetensors.index.json", "config.json", "processor_config.json"):
        try:
            data = json.loads((root / source).read_text())
        except (OSError, json.JSONDecodeError):
            continue  # absent: reported above; not JSON: transformers will say so
        if not isinstance(data, dict):
            continue
        if source.endswith("index.json"):
            refs += [(source, shard) for shard in sorted(set((data.get("weight_map") or {}).values()))]
        for ref in (data.get("auto_map") or {}).values():
            for r in ([ref] if isinstance(ref, str) else ref or []):
                if r and "--" not in r:  # "repo--module.Class" points at another repo
                    refs.append((source, r.rsplit(".", 1)[0] + ".py"))
    return sorted(set(refs))


def push(export_dir: str | Path, repo_id: str, *, revision: str | None = None, private: bool | None = None,
         create_pr: bool = False, commit_message: str | None = None, api=None) -> PushResult:
    """Create the repo if needed and upload the export in one commit.

    Args:
        export_dir: a folder written by `mmoe-ds export`.
        repo_id: the model repo ("user/name").
        revision: the branch to commit to (default: main).
        private: create the repo private (an existing repo keeps its visibility).
        create_pr: open a pull request instead of committing to the branch.
        commit_message: the commit title (default: "Upload mmoe-ds export").
        api: a `huggingface_hub.HfApi` (default: a new one; its token is HF_TOKEN or the stored login).
    Returns:
        the repo, commit and pull-request URLs."""
    plan = plan_push(export_dir, repo_id)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(plan.export_dir), repo_type="model",
                               revision=revision, create_pr=create_pr,
                               commit_message=commit_message or "Upload mmoe-ds export",
                               allow_patterns=plan.names, ignore_patterns=IGNORE)
    return PushResult(str(repo_url), str(getattr(commit, "commit_url", commit)), getattr(commit, "pr_url", None))


def hub_errors() -> tuple[type[BaseException], ...]:
    """What a push can meet from the Hub: HTTP errors, no token, and the HTTP client's connection errors
    (huggingface_hub's client library, httpx2 in 2.x, or httpx / requests in older releases)."""
    import importlib

    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    errors: list[type[BaseException]] = [HfHubHTTPError, LocalTokenNotFoundError, OSError]
    for client in ("httpx2", "httpx", "requests"):
        try:
            module = importlib.import_module(client)
        except ImportError:
            continue
        errors.append(getattr(module, "RequestException", None) or getattr(module, "HTTPError"))
    return tuple(errors)


def main(argv: list[str], api=None) -> int:
    """`mmoe-ds push EXPORT_DIR REPO_ID [--revision R] [--private] [--create-pr] [--commit-message M] [--dry-run]`.

    Args:
        argv: the command line after `push`.
        api: a `huggingface_hub.HfApi` to use (tests pass a recording one); default a new one.
    Returns:
        the exit status: 0, or 2 for a folder that is not an export or a Hub error."""
    parser = argparse.ArgumentParser(prog="mmoe-ds push", description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", help="folder written by `mmoe-ds export`")
    parser.add_argument("repo_id", help="Hub model repo, user/name or org/name (created if missing)")
    parser.add_argument("--revision", default=None, help="branch to commit to (created if missing; default main)")
    parser.add_argument("--private", action="store_true", default=None, help="create the repo private")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit-message", default=None, help='commit title (default "Upload mmoe-ds export")')
    parser.add_argument("--dry-run", action="store_true", help="print the files and the card; no network")
    args = parser.parse_args(argv)
    try:
        if args.dry_run:
            print(plan_push(args.export_dir, args.repo_id).describe())
            return 0
        result = push(args.export_dir, args.repo_id, revision=args.revision, private=args.private,
                      create_pr=args.create_pr, commit_message=args.commit_message, api=api)
    except NotAnExport as e:
        print(f"mmoe-ds push: {e}", file=sys.stderr)
        return 2
    except hub_errors() as e:  # one line, no traceback; their text never holds the token
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"mmoe-ds push: the Hub refused or could not be reached ({type(e).__name__}: {first}); log in with "
              "`hf auth login` or set HF_TOKEN, and check the repo id and your network.", file=sys.stderr)
        return 2
    print(f"pushed {args.export_dir} -> {result.pr_url or result.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
