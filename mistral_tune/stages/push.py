"""The `push` stage: upload run_dir/merged (and optionally the adapters) to the Hugging Face Hub.

The token comes from HF_TOKEN or `hf auth login` (huggingface_hub finds it) and is never written
anywhere. Transient hub errors are retried with backoff; the local checkpoint is never removed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from mistral_tune import runs
from mistral_tune.runs import RunDir
from mistral_tune.errors import UserError

log = logging.getLogger("mistral_tune")


def plan_uploads(cfg: DictConfig) -> list[tuple[Path, str]]:
    """(local folder, path in the repo) pairs to upload."""
    run_dir = RunDir.of(cfg)
    runs.require_manifest(cfg, "merge", "push")
    uploads = [(run_dir.merged, "")]
    if cfg.push.include_adapters:
        for stage in cfg.stages:
            manifest = runs.read_manifest(cfg, stage)
            if manifest and manifest["method"] != "none":
                uploads.append((run_dir.stage(stage), f"adapters/{stage}"))
    return uploads


# What stays local: checkpoints, the start model copy and the run folder's bookkeeping. Patterns
# of upload_folder's ignore_patterns (fnmatch on the path in the folder).
IGNORE = ("checkpoint-*", "start_policy/*", "manifest.json", "config.yaml", runs.STARTED)


def _files(folder: Path) -> list[Path]:
    """What upload_folder sends from `folder`: the dry run lists it by the same rule."""
    from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
    from huggingface_hub.utils import filter_repo_objects

    paths = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    return sorted(paths[k] for k in filter_repo_objects(paths, ignore_patterns=[*IGNORE, *DEFAULT_IGNORE_PATTERNS]))


def _retry(what: str, fn, max_retries: int):
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(max_retries + 1):
        try:
            return fn()
        except (HfHubHTTPError, ConnectionError, TimeoutError, OSError) as err:
            status = getattr(getattr(err, "response", None), "status_code", None)
            transient = status is None or status >= 500 or status == 429
            if not transient or attempt == max_retries:
                raise
            wait = min(2**attempt, 60)
            log.warning("push: %s failed (%s), retrying in %ds", what, str(err).splitlines()[0], wait)
            time.sleep(wait)


def run(cfg: DictConfig) -> Path:
    if not cfg.push.repo_id:
        raise UserError("push needs a repository: push.repo_id=org/name")
    uploads = plan_uploads(cfg)
    if cfg.push.dry_run:
        for folder, prefix in uploads:
            for f in _files(folder):
                dest = f"{prefix}/{f.relative_to(folder)}" if prefix else str(f.relative_to(folder))
                print(f"would upload {f} -> {cfg.push.repo_id}:{dest} ({f.stat().st_size} bytes)")
        return RunDir.of(cfg).merged
    if not runs.is_main_process():
        return RunDir.of(cfg).merged

    from huggingface_hub import HfApi

    api, repo = HfApi(), cfg.push.repo_id
    done = []
    try:
        _retry("create_repo", lambda: api.create_repo(repo, private=cfg.push.private, exist_ok=True), cfg.push.max_retries)
        if cfg.push.revision:
            _retry("create_branch", lambda: api.create_branch(repo, branch=cfg.push.revision, exist_ok=True),
                   cfg.push.max_retries)
        for folder, prefix in uploads:
            _retry(f"upload {folder}", lambda: api.upload_folder(
                repo_id=repo, folder_path=str(folder), path_in_repo=prefix or None, revision=cfg.push.revision,
                commit_message=cfg.push.commit_message,
                ignore_patterns=list(IGNORE),  # a new list: upload_folder appends its defaults to it
            ), cfg.push.max_retries)
            done.append(str(folder))
    except Exception as err:
        missing = [str(f) for f, _ in uploads if str(f) not in done]
        raise UserError(
            f"push to {repo} failed: {str(err).splitlines()[0]}; uploaded: {done or 'nothing'}; "
            f"not uploaded: {missing}",
            hint="the local checkpoint is untouched; re-run the same command to retry",
        ) from None
    log.info("push: uploaded %s to https://huggingface.co/%s", ", ".join(done), repo)
    return RunDir.of(cfg).merged
