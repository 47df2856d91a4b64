"""`capsule keys …`: the letter encryption keys (generate, rotate)."""

from __future__ import annotations

import argparse
import json

from core.crypto import Keyring, Rotation, generate_key_entry, letters_to_rotate, rotate_letters
from core.errors import CapsuleError
from core.files import append_private
from core.policy import utcnow
from tasks.cli.common import Command, get_app, settings, whole_number
from tasks.cli.progress import Progress


def cmd_generate(args: argparse.Namespace) -> int:
    config = settings()
    entry = generate_key_entry(args.id or f"k{utcnow():%Y%m%d%H%M%S}")
    if args.print:
        print(entry)
        return 0
    if config.encryption_keys:
        raise CapsuleError(
            "CAPSULE_ENCRYPTION_KEYS is set: append the key printed by `capsule keys generate --print` there"
        )
    path = config.keys_path
    existing = path.read_text() if path.exists() else ""
    if args.if_missing and existing.strip():
        print(f"keyring {path} already exists")
        return 0
    Keyring.parse(existing + "\n" + entry, variable=str(path))  # rejects a duplicate id
    append_private(path, entry + "\n")  # 0600 from its first byte, in a 0700 directory
    print(f"added key {entry.split(':')[0]} to {path}; it now encrypts new letters")
    return 0


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--id", help="key id (default: k<timestamp>)")
    p.add_argument("--print", action="store_true", help="only print the new id:key entry")
    p.add_argument("--if-missing", action="store_true", help="do nothing when a keyring exists")


def cmd_rotate(args: argparse.Namespace) -> int:
    app = get_app()
    if args.batch_size < 1:
        raise CapsuleError("--batch-size must be at least 1")
    # Progress on stderr (a bar on a terminal, a line a second otherwise): stdout stays the report.
    total = letters_to_rotate(app.session_factory, app.keyring)
    progress = Progress("keys rotate", total, words=("rotated", "skipped"))
    result = rotate_letters(
        app.session_factory, app.keyring, batch_size=args.batch_size, progress=progress.update
    )
    progress.update(result.rotated, len(result.skipped), final=True)
    if args.json:
        _print_rotation_json(app.keyring.active_id, result)
    else:
        _print_rotation(app.keyring.active_id, result)
    # Non-zero so a script notices; nothing failed to be written, so not the error status 2.
    return 1 if result.skipped else 0


def _print_rotation_json(active_id: str, result: Rotation) -> None:
    skipped = [
        {"letter_id": str(s.letter_id), "key_id": s.key_id, "reason": s.reason}
        for s in result.skipped
    ]
    print(json.dumps({"active_key": active_id, "rotated": result.rotated, "skipped": skipped}))


def _print_rotation(active_id: str, result: Rotation) -> None:
    print(
        f"re-encrypted {result.rotated} letters under key {active_id}; "
        f"skipped {len(result.skipped)}"
    )
    for s in result.skipped:
        why = (
            f"key {s.key_id!r} is not in the keyring"
            if s.reason == "missing_key"
            else f"fails authentication under key {s.key_id!r} (tampered or wrong key)"
        )
        print(f"skipped letter {s.letter_id}: {why}")


def _rotate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=whole_number(1, 100_000), default=500)
    p.add_argument(
        "--json", action="store_true", help="print the counts and the skipped letters as JSON"
    )


COMMANDS = (
    Command(
        "keys generate",
        cmd_generate,
        "add a new key (it encrypts from now on) to the embedded keyring",
        _generate_arguments,
    ),
    Command(
        "keys rotate",
        cmd_rotate,
        "re-encrypt every letter under the newest key (resumable); letters it cannot open are "
        "skipped and listed, and the exit status is 1 when any were",
        _rotate_arguments,
    ),
)
