"""`fastnca zoo`: the trained NCAs shipped with fastnca, usable as zoo:NAME.

Example:
    fastnca zoo
    fastnca export zoo:stripes -o stripes.html
"""

from __future__ import annotations


def add_parser(sub):
    return sub.add_parser(
        "zoo",
        help="list the trained NCAs shipped with fastnca (use them as zoo:NAME)",
        description="List the small trained NCAs in the package: name, size, architecture and "
        "the command that trained each. Any command that takes a checkpoint takes zoo:NAME.",
    )


def run(args) -> int:
    from fastnca.nca.checkpoint import load_checkpoint
    from fastnca.nca.zoo import ZOO_DIR, zoo_names

    names = zoo_names()
    if not names:
        print(f"the zoo is empty ({ZOO_DIR} holds no .pt files)")
        return 0
    print(f"{'NAME':<10} {'KB':>4}  {'C':>2} {'HID':>3}  TRAINED WITH")
    for name in names:
        path = ZOO_DIR / f"{name}.pt"
        cfg = load_checkpoint(path).config
        zoo = cfg.get("zoo") or {}
        print(
            f"zoo:{name:<6} {path.stat().st_size / 1024:>4.0f}  {cfg['channels']:>2} "
            f"{cfg['hidden']:>3}  {zoo.get('command', '?')}"
        )
    print("use: fastnca export zoo:NAME -o NAME.html  |  fastnca render zoo:NAME -o NAME.gif")
    return 0
