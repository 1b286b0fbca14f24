"""`python -m lora_tutorial.tools.lab`: registers this Python as a Jupyter kernel, starts JupyterLab in
notebooks/ on 127.0.0.1 with its token on, prints the SSH line to it. Other arguments go to `jupyter lab`."""

import argparse
import getpass
import os
import socket
import subprocess
import sys
from pathlib import Path

from .run import notebooks_dir

KERNEL_NAME, KERNEL_DISPLAY_NAME = "lora-tutorial", "Python (lora-tutorial)"

def register_kernel() -> None:
    done = subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user", "--name", KERNEL_NAME,
                           "--display-name", KERNEL_DISPLAY_NAME], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"Could not register the Jupyter kernel ({done.stderr.strip()}); is ipykernel "
                         "installed? `python -m pip install -r requirements.txt` installs it.")
    print(f'Kernel "{KERNEL_DISPLAY_NAME}" runs {sys.executable}.')

def lab_command(ip: str, port: int, root: Path, extra: list[str]) -> list[str]:
    """`jupyter lab` with no browser and the token left on; --allow-root only as root (a container)."""
    root_user = ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    return [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--ip={ip}", f"--port={port}",
            f"--ServerApp.root_dir={root}", *root_user, *extra]

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_tutorial.tools.lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8888, help="port on this machine (default 8888)")
    parser.add_argument("--ip", default="127.0.0.1", help="default 127.0.0.1 (0.0.0.0: in a container only)")
    parser.add_argument("--notebooks", type=Path, help="folder JupyterLab opens (default: notebooks/)")
    parser.add_argument("--no-register", action="store_true", help="do not (re-)register the kernel")
    args, extra = parser.parse_known_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port={args.port}: expected a port number from 1 to 65535")
    if not (root := (args.notebooks or notebooks_dir()).resolve()).is_dir():
        parser.error(f"--notebooks={args.notebooks}: no such folder")
    for name, _, value in (argument.partition("=") for argument in extra):
        if name.endswith(".token") and not value.strip("'\""):
            parser.error(f"{name}={value}: an empty token lets anyone run code as you; keep the token on")
    if not args.no_register:
        register_kernel()
    login, port = f"{getpass.getuser()}@{socket.gethostname()}", args.port
    print(f"From your laptop: ssh -N -L {port}:localhost:{port} {login}\nthen open the "
          f"http://127.0.0.1:{port}/lab?token=... address JupyterLab prints below.", flush=True)
    command = lab_command(args.ip, port, root, extra)
    if os.name != "posix":
        return subprocess.call(command)
    os.execv(command[0], command)  # JupyterLab takes over this process: Ctrl-C stops it

if __name__ == "__main__":
    sys.exit(main())
