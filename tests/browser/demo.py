"""Drives the two demo pages of a running `nexus dev` in headless Chromium (Debian's
/usr/bin/chromium, driven by Playwright's driver; no browser download).

    python3 tests/browser/demo.py BASE_URL ARTEFACT_DIR

The agent console (page A) goes ready; the widget (page B) starts a chat and sends; A accepts
the offer, sees the message and replies; B sees the reply; B sends a file that A downloads, A
sends one that B downloads (bytes compared). A second agent's console (page C, `?agent=1`) goes
ready; A invites C to consult, C accepts, sees what was said, writes (B sees it) and leaves; A
writes a note for agents only and invites C in private, C writes and leaves, A answers B: B sees
that answer and neither the note nor anything of C's private part; A transfers the chat to C, C accepts and replies (B sees it) and completes; B sees the end.
Screenshots of both pages at each key moment go to ARTEFACT_DIR. Any step that does not happen
within STEP_MS exits non-zero naming the step, with screenshots and page logs of the failure.
"""

import os
import sys
import time

CHROMIUM = os.environ.get("NEXUS_TEST_CHROMIUM", "/usr/bin/chromium")
# One step on a loaded 2-core machine: a bus round trip or two plus rendering, well under this.
STEP_MS = 15_000
CUSTOMER_TEXT = "hello from the browser"
AGENT_TEXT = "hi, this is the agent speaking"
CONSULTANT_TEXT = "a colleague here, consulting"
SECOND_TEXT = "second agent here, I take it from now"
NOTE_TEXT = "note for agents: a returning customer"
PRIVATE_TEXT = "privately: offer the voucher"
AFTER_PRIVATE_TEXT = "thanks for waiting, here is a voucher"
CUSTOMER_FILE = b"order 1234: two chairs\n"
AGENT_FILE = b"assembly plan: step 1, unpack\n"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def fail(msg):
    print(f"demo.py: {msg}", file=sys.stderr)
    sys.exit(1)


try:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright
except ImportError:
    fail("the Python module `playwright` is missing: `python3 -m pip install playwright` "
         "(its driver only; never `playwright install`, the browser is Debian's chromium)")


class Flow:
    def __init__(self, base, out, agent, widget, second):
        self.base, self.out = base.rstrip("/"), out
        self.agent, self.widget, self.second = agent, widget, second
        self.pages = (("agent", agent), ("widget", widget), ("second-agent", second))
        self.logs = {name: [] for name, _ in self.pages}
        for name, page in self.pages:
            page.set_default_timeout(STEP_MS)
            page.on("console", lambda m, n=name: self.logs[n].append(f"console.{m.type}: {m.text}"))
            page.on("pageerror", lambda e, n=name: self.logs[n].append(f"pageerror: {e}"))
        self.step_name = "start"

    def shoot(self, moment):
        for name, page in self.pages:
            page.screenshot(path=os.path.join(self.out, f"{moment}-{name}.png"), full_page=True)

    def step(self, name, fn):
        self.step_name = name
        started = time.monotonic()
        fn()
        print(f"ok  {name} ({time.monotonic() - started:.1f}s)", flush=True)

    def run(self):
        a, b, c = self.agent, self.widget, self.second
        agent_log, widget_log, second_log = a.locator("#log"), b.locator("#log"), c.locator("#log")

        def ready(page, path):
            page.goto(f"{self.base}{path}")
            # The socket is open once the hello named the agent.
            page.wait_for_function("document.getElementById('who').textContent.length > 0")
            page.click("#ready")
            # The ack only says the request was published; wait until the worker applied it
            # (`token`: the page's own agent token).
            page.wait_for_function(
                """async () => {
                    const me = await (await fetch('/v1/agent/me',
                        { headers: { authorization: 'Bearer ' + token } })).json();
                    return me.ready === true;
                }""",
                polling=200,
            )
            # The worker tells the console the state it applied.
            page.wait_for_function("document.getElementById('status').textContent === 'ready'")

        def agent_ready():
            ready(a, "/demo/agent")

        def second_ready():
            ready(c, "/demo/agent?agent=1")
            c.wait_for_function("document.getElementById('who').textContent === 'Second Agent'")

        def customer_sends():
            b.goto(f"{self.base}/demo/widget")
            b.wait_for_function("document.getElementById('status').textContent === 'ready'")
            b.fill("#nickname", "Browser Customer")
            b.click("#startBtn")
            b.wait_for_function("document.getElementById('status').textContent === 'connected'")
            b.wait_for_selector("#start", state="hidden")
            b.fill("#text", CUSTOMER_TEXT)
            b.click("#sendBtn")
            widget_log.get_by_text(CUSTOMER_TEXT).wait_for()

        def agent_accepts():
            a.locator(".offer .accept").first.click()
            agent_log.get_by_text(CUSTOMER_TEXT).wait_for()

        def agent_replies():
            a.fill("#text", AGENT_TEXT)
            a.click("#sendBtn")
            agent_log.get_by_text(AGENT_TEXT).wait_for()

        def customer_sees_reply():
            widget_log.get_by_text(AGENT_TEXT).wait_for()

        def send_file(sender, sender_log, receiver, receiver_log, name, data, who):
            # Sent through the page's file input; shown on both sides; downloaded on the other.
            sender.set_input_files("#file", files=[
                {"name": name, "mimeType": "text/plain", "buffer": data}])
            sender_log.get_by_text(name).wait_for()
            link = receiver_log.get_by_text(name)
            link.wait_for()
            with receiver.expect_download() as got:
                link.click()
            with open(got.value.path(), "rb") as f:
                if f.read() != data:
                    raise PlaywrightError(f"{who}: the download differs from what was sent")

        def files_both_ways():
            send_file(b, widget_log, a, agent_log, "receipt.txt", CUSTOMER_FILE, "customer to agent")
            send_file(a, agent_log, b, widget_log, "plan.txt", AGENT_FILE, "agent to customer")

        def consult():
            a.select_option("#target", label="Agent: Second Agent")
            a.click("#consultBtn")
            c.get_by_text("invites you to consult").wait_for()
            c.locator(".offer .accept").first.click()
            # The consultant reads what was said before it joined.
            second_log.get_by_text(CUSTOMER_TEXT).wait_for()
            c.wait_for_selector("#leaveBtn", state="visible")
            c.fill("#text", CONSULTANT_TEXT)
            c.click("#sendBtn")
            widget_log.get_by_text(CONSULTANT_TEXT).wait_for()
            agent_log.get_by_text(CONSULTANT_TEXT).wait_for()

        def consultant_leaves():
            c.click("#leaveBtn")
            second_log.get_by_text("You left the conversation.").wait_for()

        def private_consult():
            a.check("#internal")
            a.fill("#text", NOTE_TEXT)
            a.click("#sendBtn")
            a.uncheck("#internal")
            agent_log.locator(".internal").get_by_text(NOTE_TEXT).wait_for()
            a.select_option("#target", label="Agent: Second Agent")
            a.click("#privateBtn")
            c.get_by_text("invites you to consult").wait_for()
            c.locator(".offer .accept").first.click()
            second_log.get_by_text(NOTE_TEXT).wait_for()
            c.fill("#text", PRIVATE_TEXT)
            c.click("#sendBtn")
            agent_log.locator(".internal").get_by_text(PRIVATE_TEXT).wait_for()
            c.click("#leaveBtn")
            second_log.get_by_text("You left the conversation.").wait_for()
            a.fill("#text", AFTER_PRIVATE_TEXT)
            a.click("#sendBtn")
            # Entries arrive in order: once the answer is shown, the private ones would be too.
            widget_log.get_by_text(AFTER_PRIVATE_TEXT).wait_for()
            for private in (NOTE_TEXT, PRIVATE_TEXT):
                if widget_log.get_by_text(private).count() != 0:
                    raise PlaywrightError(f"the customer sees a private entry: {private!r}")

        def transfer():
            a.select_option("#target", label="Agent: Second Agent")
            a.click("#transferBtn")
            agent_log.get_by_text("Transferred.").wait_for()
            c.get_by_text("wants to chat").wait_for()
            c.locator(".offer .accept").first.click()
            # Open again on C's side: the holder's buttons, enabled.
            c.wait_for_selector("#completeBtn:not([disabled])", state="visible")
            c.fill("#text", SECOND_TEXT)
            c.click("#sendBtn")
            widget_log.get_by_text(SECOND_TEXT).wait_for()

        def agent_completes():
            c.click("#completeBtn")
            second_log.get_by_text("Conversation ended.").wait_for()

        def customer_sees_end():
            widget_log.get_by_text("The chat has ended.").wait_for()
            b.wait_for_selector("#send", state="hidden")

        self.step("agent opens the console and goes ready", agent_ready)
        self.step("customer starts a chat and sends", customer_sends)
        self.shoot("1-customer-waiting")
        self.step("agent accepts the offer and sees the message", agent_accepts)
        self.step("agent replies", agent_replies)
        self.step("customer sees the reply", customer_sees_reply)
        self.shoot("2-reply")
        self.step("files go both ways and download", files_both_ways)
        self.shoot("3-files")
        self.step("a second agent opens the console and goes ready", second_ready)
        self.step("the agent invites it to consult; it joins and writes", consult)
        self.shoot("4-consult")
        self.step("the consultant leaves", consultant_leaves)
        self.step("a note and a private consult stay off the customer's page", private_consult)
        self.shoot("5-private-consult")
        self.step("the agent transfers the chat to it; it accepts and replies", transfer)
        self.shoot("6-transferred")
        self.step("the second agent completes", agent_completes)
        self.step("customer sees the end", customer_sees_end)
        self.shoot("7-ended")

    def report_failure(self, error):
        print(f"demo.py: FAILED at step '{self.step_name}': {error}", file=sys.stderr)
        try:
            self.shoot("failed")
            print(f"demo.py: screenshots of the failure: {self.out}/failed-*.png", file=sys.stderr)
        except PlaywrightError as e:
            print(f"demo.py: no failure screenshot: {e}", file=sys.stderr)
        for name, lines in self.logs.items():
            for line in lines[-20:]:
                print(f"  {name} {line}", file=sys.stderr)


def main():
    if len(sys.argv) != 3:
        fail("usage: demo.py BASE_URL ARTEFACT_DIR")
    base, out = sys.argv[1], sys.argv[2]
    if not os.access(CHROMIUM, os.X_OK):
        fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (Debian's package)")
    os.makedirs(out, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            # Two contexts: the customer and the agent share no storage, as on two machines.
            viewport = {"width": 1000, "height": 700}
            agent = browser.new_context(viewport=viewport).new_page()
            widget = browser.new_context(viewport=viewport).new_page()
            second = browser.new_context(viewport=viewport).new_page()
            flow = Flow(base, out, agent, widget, second)
            try:
                flow.run()
            except PlaywrightError as e:
                flow.report_failure("\n".join(str(e).splitlines()[:6]) or repr(e))
                sys.exit(1)
        finally:
            browser.close()
    print(f"demo.py: the demo flow passed; screenshots in {out}")


if __name__ == "__main__":
    main()
