"""Send prompts to a text generation server and print its replies.

    python tools/text_generation_cli.py localhost:5000 < prompts.txt
    echo "Hello world" | python tools/text_generation_cli.py http://host:5000/api -n 32

Every line of stdin is one prompt (an interactive terminal gets a prompt string); each
reply's text (prompt + continuation) is printed followed by an empty line. URL is
HOST:PORT (the server's /api) or a full http:// address. An error reply is printed to
stderr as "Error STATUS: message" and the next prompt is sent; the exit status is 1 if
any prompt failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request


def api_url(url: str) -> str:
    """HOST:PORT -> http://HOST:PORT/api; a full http(s) URL is kept."""
    if url.startswith(("http://", "https://")):
        return url
    return f"http://{url.rstrip('/')}/api"


def put_json(url: str, body: dict, timeout: float = 600.0) -> tuple[int, dict]:
    """PUT body as JSON -> (HTTP status, the JSON reply; {"message": text} when the
    reply is not JSON)."""
    data = json.dumps(body).encode("utf-8")
    request = urllib.request.Request(
        url, data=data, method="PUT", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            status, raw = reply.status, reply.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw.decode("utf-8"))
    except ValueError:
        return status, {"message": raw.decode("utf-8", errors="replace")}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="HOST:PORT of the server, or its full /api URL")
    parser.add_argument("-n", "--tokens-to-generate", type=int, default=64,
                        help="New tokens per prompt (default 64).")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top_k", type=int, default=None, help="1: greedy decoding.")
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--random-seed", type=int, default=None)
    parser.add_argument("--stop-on-eol", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    url = api_url(args.url)
    interactive = sys.stdin.isatty()
    failed = False
    while True:
        if interactive:
            print("Enter prompt: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        body = {"prompts": [line.rstrip("\n")], "tokens_to_generate": args.tokens_to_generate}
        for key, value in (("temperature", args.temperature), ("top_k", args.top_k),
                           ("top_p", args.top_p), ("random_seed", args.random_seed)):
            if value is not None:
                body[key] = value
        if args.stop_on_eol:
            body["stop_on_eol"] = True
        try:
            status, reply = put_json(url, body)
        except OSError as e:
            print(f"Error: cannot reach {url} ({e})", file=sys.stderr)
            return 1
        if status != 200:
            print(f"Error {status}: {reply.get('message', reply)}", file=sys.stderr)
            failed = True
            continue
        print(reply["text"][0])
        print(flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
