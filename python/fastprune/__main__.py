"""``python -m fastprune``: run an unmodified script or module with
``torch.nn.utils.prune`` patched to compute with fastprune.

Works like ``python -m cProfile``: the script (or module) runs as
``__main__`` with ``sys.argv`` set to what it would get on its own, and its
exit status is this process's.
"""
import os
import runpy
import sys

USAGE = """\
usage: python -m fastprune script.py [args ...]
       python -m fastprune -m module [args ...]

Runs the script (or module, as python -m would) with torch.nn.utils.prune
patched to compute its masks with fastprune (fastprune.patch()), so that code
which imports torch.nn.utils.prune, itself or through a framework, prunes with
fastprune without changing a line. The arguments after the script or module
are passed to it unchanged, and its exit status is returned.

It also sets FASTPRUNE_PATCH=1 in the environment, which child processes
inherit: workers started with torch.multiprocessing, torchrun or subprocess
are patched when they import torch (or fastprune). FASTPRUNE_PATCH=1 alone
does the same for launchers whose command cannot be changed.
"""


def main(argv=None):
    """Run the script or module that ``argv`` names, patched.

    Args:
        argv (list[str], optional): the arguments after ``python -m fastprune``;
            default ``sys.argv[1:]``.

    Returns:
        int: 0 after the script returns normally; its ``SystemExit`` (and any
        other exception) propagates, so the interpreter exits as the script
        would.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "-m" and len(argv) < 2:
        print("python -m fastprune: -m needs a module name\n\n" + USAGE, end="", file=sys.stderr)
        return 2

    os.environ["FASTPRUNE_PATCH"] = "1"
    import fastprune  # patches, as FASTPRUNE_PATCH=1 says
    fastprune.patch()  # (already imported before the variable was set)

    if argv[0] == "-m":
        # As python -m: sys.path[0] stays the working directory; runpy sets
        # sys.argv[0] to the module's file.
        sys.argv = [argv[1]] + argv[2:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        script = argv[0]
        if not os.path.exists(script):
            print(f"python -m fastprune: can't open file {script!r}: no such file", file=sys.stderr)
            return 2
        # As python script.py: the script's directory first on the path.
        sys.argv = argv
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
