"""Calls a running `nexus dev`'s Chat API v3 from pages of other origins in headless Chromium
(Debian's /usr/bin/chromium, driven by Playwright's driver), as a widget embedded on a company's
site does.

    python3 tests/browser/cors.py BASE_URL ALLOWED_PORT

nexus must allow the origin http://127.0.0.1:ALLOWED_PORT (`http.cors_allowed_origins`). A page
served there starts a session (POST with `x-api-key`: a preflight), reads its transcript (GET
with `x-nexus-client-key`) and receives its first event over SSE (EventSource), all cross-origin.
A page served on another port, an origin nexus does not list, must be refused by the browser.
Exits non-zero naming the step that failed.
"""

import http.server
import json
import os
import sys
import threading
import urllib.request

CHROMIUM = os.environ.get("NEXUS_TEST_CHROMIUM", "/usr/bin/chromium")
STEP_MS = 15_000
ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
PAGE = b"<!doctype html><title>a shop</title><p>a page of the company's own site</p>"

# Runs in the page: the calls a widget makes, answering what it saw.
CALLS = """async ([base, key]) => {
  const started = await fetch(base + '/nexus/v3/chat/sessions', {
    method: 'POST',
    headers: {'content-type': 'application/json', 'x-api-key': key},
    body: JSON.stringify({nickname: 'Shopper', text: 'hello across origins'}),
  });
  const s = await started.json();
  if (started.status !== 201) return {step: 'start', status: started.status, body: s};
  // Long polls from where the last left off, until the first message is in (the conversation
  // worker applies the start a moment after it was accepted).
  const page = {messages: []};
  for (let from = 1, tries = 0; tries < 5; tries++) {
    const read = await fetch(
      `${base}/nexus/v3/chat/sessions/${s.session_id}/messages?from=${from}&wait_s=5`,
      {headers: {'x-api-key': key, 'x-nexus-client-key': s.client_key}});
    const got = await read.json();
    if (read.status !== 200) return {step: 'read', status: read.status, body: got};
    page.messages.push(...got.messages);
    from = got.next_position;
    if (page.messages.some((m) => m.text === 'hello across origins')) break;
  }
  const event = await new Promise((resolve) => {
    const url = `${base}/nexus/v3/chat/sessions/${s.session_id}/events?from=1`
      + `&api_key=${encodeURIComponent(key)}&client_key=${encodeURIComponent(s.client_key)}`;
    const source = new EventSource(url);
    source.onmessage = (e) => { source.close(); resolve(JSON.parse(e.data)); };
    source.onerror = () => { source.close(); resolve(null); };
  });
  return {step: 'done', read: page, event};
}"""


def fail(msg):
    print(f"cors.py: {msg}", file=sys.stderr)
    sys.exit(1)


try:
    from playwright.sync_api import sync_playwright
except ImportError:
    fail("the Python module `playwright` is missing: `python3 -m pip install playwright`")


class Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *_):
        pass


def serve(port):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main():
    if len(sys.argv) != 3:
        fail("usage: cors.py BASE_URL ALLOWED_PORT")
    base, allowed_port = sys.argv[1].rstrip("/"), int(sys.argv[2])
    key = json.load(urllib.request.urlopen(f"{base}/demo/config.json"))["api_key"]
    allowed, other = serve(allowed_port), serve(0)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(STEP_MS)
            page.goto(f"http://127.0.0.1:{allowed_port}/")
            got = page.evaluate(CALLS, [base, key])
            if got.get("step") != "done":
                fail(f"the allowed origin's call failed at {got}")
            texts = [m.get("text") for m in got["read"].get("messages", [])]
            if "hello across origins" not in texts:
                fail(f"the transcript read across origins lacks the first message: {got['read']}")
            if not got.get("event") or got["event"].get("position") != 1:
                fail(f"no first event over SSE across origins: {got.get('event')}")
            page.goto(f"http://127.0.0.1:{other.server_address[1]}/")
            refused = page.evaluate(
                """async ([base, key]) => {
                  try {
                    await fetch(base + '/nexus/v3/chat/sessions', {method: 'POST',
                      headers: {'content-type': 'application/json', 'x-api-key': key},
                      body: JSON.stringify({nickname: 'Intruder'})});
                    return 'answered';
                  } catch (e) { return 'refused: ' + e.name; }
                }""",
                [base, key],
            )
            if not refused.startswith("refused"):
                fail(f"a page of an origin nexus does not list could call the API ({refused})")
        finally:
            browser.close()
            allowed.shutdown()
            other.shutdown()
    print("cors.py: a page of the allowed origin chatted across origins (fetch and SSE); "
          "another origin was refused")


if __name__ == "__main__":
    main()
