"""`push`: upload a converted checkpoint to the Hugging Face Hub with its model card.

The token comes from `token=`, else HF_TOKEN / the login cache (`huggingface_hub.get_token`), and
is never printed or logged: errors from the Hub are scrubbed of it before they are shown.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from normswap.errors import NormswapError
from normswap.export.card import build_card, find_results
from normswap.export.remote import check_checkpoint, export_for_hub
from normswap.log import logger

_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")


def default_export_dir(folder: str | os.PathLike) -> Path:
    p = Path(folder).resolve()
    return p.parent / f"{p.name}-hub"


def prepare(folder: str | os.PathLike, repo_id: str, out: str | os.PathLike, *, results: str | None = None) -> dict[str, Any]:
    """Write the exact upload folder (files, modeling code, config with auto_map, README card)."""
    if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise NormswapError(f"{repo_id!r} is not a Hub repository id (expected name or owner/name)")
    check_checkpoint(folder)
    job, role = find_results(folder, results)
    if results and job is None:
        raise NormswapError(f"{results} has no recipe job whose converted or recovered model is {folder}")
    card = build_card(folder, repo_id, job=job, role=role)
    files = export_for_hub(folder, out, card=card)
    return {"folder": str(out), "card": str(Path(out) / "README.md"), "files": files,
            "results": (job or {}).get("name"), "role": role}


def push(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         dry_run: bool = False, export_dir: str | os.PathLike | None = None, results: str | None = None,
         commit_message: str | None = None, token: str | None = None) -> dict[str, Any]:
    """Export `folder` and upload it to `repo_id` (or, with dry_run, only write the export and say where)."""
    check_checkpoint(folder)
    if not dry_run:
        from huggingface_hub import get_token

        token = token or get_token()
        if not token:
            raise NormswapError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry-run)")
    info: dict[str, Any] = {"repo_id": repo_id, "private": private, "revision": revision, "dry_run": dry_run}
    if dry_run:
        out = Path(export_dir) if export_dir else default_export_dir(folder)
        info.update(prepare(folder, repo_id, out, results=results))
        return info
    tmp = Path(export_dir) if export_dir else Path(tempfile.mkdtemp(prefix="normswap-push-")) / "export"
    try:
        info.update(prepare(folder, repo_id, tmp, results=results))
        info["url"] = _upload(tmp, repo_id, token=token, private=private, revision=revision,
                              commit_message=commit_message or f"Upload {Path(folder).name} converted with normswap")
    finally:
        if export_dir is None:
            shutil.rmtree(tmp.parent, ignore_errors=True)
            info["folder"] = None
    return info


def _upload(folder: Path, repo_id: str, *, token: str, private: bool, revision: str | None, commit_message: str) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        repo = getattr(url, "repo_id", None) or repo_id
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True, repo_type="model")
        logger.info("uploading %s to %s%s", folder, repo, f" ({revision})" if revision else "")
        commit = api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model", revision=revision,
                                   commit_message=commit_message)
    except Exception as err:  # HTTP errors, no network, bad token...
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NormswapError(f"upload to {repo_id} failed: {msg.replace(token, '***')[:300]}") from None
    return str(getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo}")
