"""Single situations of the demo pages, one per run, against a running `nexus dev`, in headless
Chromium (Debian's /usr/bin/chromium, driven by Playwright's driver; no browser download).

    python3 tests/browser/cases.py BASE_URL CASE

Where demo.py walks the happy path, each case here puts a page in a situation a contact centre
meets: served behind a path prefix, a network drop (a proxy in front of nexus that cuts every
connection and refuses new ones until restored), a customer leaving while an offer rings, a
refused transfer or message, an expired file, a long transcript, a double click, a client key
outlived, typing left behind, a reload, a new chat after one ended, an API key disabled or an
agent token rotated under an open socket, drafts of several chats, an offer's countdown, typing
both ways. A page that needs it reaches nexus through a `Proxy` of its own, so one page's
network can drop while the other's stays up. The Rust test of each case (tests/browser.rs)
starts nexus with the config the case names, and gives the admin token as
NEXUS_TEST_ADMIN_TOKEN. Exits non-zero naming the step that failed, with the pages' console
logs.
"""

import json
import os
import socket
import sys
import threading
import time
import urllib.request

CHROMIUM = os.environ.get("NEXUS_TEST_CHROMIUM", "/usr/bin/chromium")
STEP_MS = 15_000
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# A nickname that is markup: shown as text, never parsed.
EVIL = '<img src=x onerror="window.pwned=1"><b>Eve</b>'


def fail(msg):
    print(f"cases.py: {msg}", file=sys.stderr)
    sys.exit(1)


try:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright
except ImportError:
    fail("the Python module `playwright` is missing: `python3 -m pip install playwright`")


class Proxy:
    """A TCP proxy to nexus for one page: serves nexus under `prefix` (a request outside it is
    404), and `cut()` drops every connection and refuses new ones until `restore()`, as a
    network drop does. Each HTTP request gets a connection of its own (`Connection: close`), so
    only the first request line of a connection needs rewriting; a WebSocket upgrade keeps its
    connection."""

    def __init__(self, upstream, prefix=""):
        host, port = upstream.split("//", 1)[1].rstrip("/").split(":")
        self.upstream, self.prefix = (host, int(port)), prefix.rstrip("/")
        self.down, self.conns, self.lock = False, set(), threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}{self.prefix}"
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self):
        with self.lock:
            self.down = True
            for s in self.conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.conns.clear()

    def restore(self):
        self.down = False

    def _accept(self):
        while True:
            client, _ = self.listener.accept()
            if self.down:
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(65536)
            if not chunk:
                client.close()
                return
            head += chunk
        head, rest = head.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        method, target, version = lines[0].split(b" ", 2)
        prefix = self.prefix.encode()
        if not target.startswith(prefix + b"/"):
            client.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            client.close()
            return
        target = target[len(prefix):]
        upgrade = any(line.lower().startswith(b"upgrade:") for line in lines[1:])
        headers = [line for line in lines[1:] if upgrade or not line.lower().startswith(b"connection:")]
        if not upgrade:
            headers.append(b"Connection: close")
        try:
            server = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        with self.lock:
            if self.down:
                client.close()
                server.close()
                return
            self.conns.update((client, server))
        server.sendall(b"\r\n".join([b" ".join([method, target, version]), *headers]) + b"\r\n\r\n" + rest)
        threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()
        self._pipe(client, server)

    def _pipe(self, src, dst):
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self.lock:
            self.conns.discard(src)
            self.conns.discard(dst)


def wait_text(page, sel, expected):
    page.wait_for_function("([s, t]) => document.querySelector(s).textContent === t", arg=[sel, expected])


def wait_contains(page, sel, expected):
    page.wait_for_function("([s, t]) => document.querySelector(s).textContent.includes(t)",
                           arg=[sel, expected])


def agent_ready(page, url):
    page.goto(url)
    page.wait_for_function("document.getElementById('who').textContent.length > 0")
    page.click("#ready")
    wait_text(page, "#status", "ready")


def customer_starts(page, url, nickname="Customer", text=None):
    page.goto(url)
    wait_text(page, "#status", "ready")
    page.fill("#nickname", nickname)
    page.click("#startBtn")
    page.wait_for_selector("#send", state="visible")
    wait_text(page, "#status", "connected")
    if text:
        page.fill("#text", text)
        page.press("#text", "Enter")
        page.locator("#log").get_by_text(text).wait_for()


def accept(agent):
    agent.locator(".offer .accept").first.click()
    agent.wait_for_selector("#completeBtn:not([disabled])", state="visible")


def count(locator, expected, what):
    n = locator.count()
    if n != expected:
        raise PlaywrightError(f"{what}: {n} shown, {expected} expected")


def sockets_of(page):
    """The URLs of the WebSockets `page` opens from now on (a list that grows)."""
    opened = []
    page.on("websocket", lambda ws: opened.append(ws.url))
    return opened


def no_new_sockets(page, opened, what):
    """`page` opens no WebSocket for 2.5 s (a page retrying every second would)."""
    before = len(opened)
    page.wait_for_timeout(2500)
    if len(opened) != before:
        raise PlaywrightError(f"{what}: {len(opened) - before} sockets opened again")


class Cases:
    def __init__(self, base, browser):
        self.base, self.browser = base.rstrip("/"), browser
        self.logs, self.step_name = [], "start"

    def page(self, name):
        # A context each: two people on two machines share no storage.
        page = self.browser.new_context(viewport={"width": 1000, "height": 700}).new_page()
        page.set_default_timeout(STEP_MS)
        page.on("console", lambda m: self.logs.append(f"{name} console.{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.logs.append(f"{name} pageerror: {e}"))
        return page

    def admin(self, method, path, body=None):
        """A call to the provisioning API of the demo tenant (`path` under it)."""
        with urllib.request.urlopen(f"{self.base}/demo/config.json", timeout=10) as r:
            tenant = json.load(r)["tenant_id"]
        req = urllib.request.Request(
            f"{self.base}/v1/admin/tenants/{tenant}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"authorization": f"Bearer {os.environ['NEXUS_TEST_ADMIN_TOKEN']}",
                     "content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            data = r.read()
        return json.loads(data) if data else None

    def step(self, name, fn):
        self.step_name = name
        started = time.monotonic()
        fn()
        print(f"ok  {name} ({time.monotonic() - started:.1f}s)", flush=True)

    # --- cases -------------------------------------------------------------------------------

    def path_prefix(self):
        """Both pages served by a proxy under /support/: every request and socket keeps it."""
        agent_proxy, widget_proxy = Proxy(self.base, "/support"), Proxy(self.base, "/support")
        a, b = self.page("agent"), self.page("widget")
        self.step("the console goes ready under the prefix",
                  lambda: agent_ready(a, f"{agent_proxy.url}/demo/agent"))
        self.step("the widget starts a chat under the prefix", lambda: customer_starts(
            b, f"{widget_proxy.url}/demo/widget", EVIL, "hello under a prefix"))

        def agent_replies():
            a.locator(".offer").get_by_text(EVIL).wait_for()
            accept(a)
            a.locator("#log").get_by_text("hello under a prefix").wait_for()
            a.fill("#text", "answer under a prefix")
            a.press("#text", "Enter")
            b.locator("#log").get_by_text("answer under a prefix").wait_for()
        self.step("the agent accepts and replies", agent_replies)

        def file_downloads():
            # A file name of markup too (no slash: a name keeps its last path component; no
            # quote: the browser's multipart encodes it).
            name = "<img src=x onerror=window.pwned=2>.txt"
            b.set_input_files("#file", files=[{"name": name, "mimeType": "text/plain",
                                               "buffer": b"prefixed bytes\n"}])
            b.locator("#log").get_by_text(name).wait_for()
            link = a.locator("#log").get_by_text(name)
            link.wait_for()
            with a.expect_download() as got:
                link.click()
            with open(got.value.path(), "rb") as f:
                if f.read() != b"prefixed bytes\n":
                    raise PlaywrightError("the download differs from what was sent")
        self.step("a file goes up and down under the prefix", file_downloads)

        def markup_is_text():
            a.locator("#convs").get_by_text(EVIL).wait_for()
            for page in (a, b):
                if page.evaluate("window.pwned") is not None:
                    raise PlaywrightError("a nickname ran as markup")
        self.step("a nickname of markup is shown as text", markup_is_text)

    def offer_withdrawn(self):
        """The customer leaves while the offer rings: the offer goes, and no chat is listed."""
        a, b = self.page("agent"), self.page("widget")
        self.step("agent ready", lambda: agent_ready(a, f"{self.base}/demo/agent"))
        self.step("customer starts", lambda: customer_starts(b, f"{self.base}/demo/widget", "Leaver"))
        self.step("the offer rings", lambda: a.locator(".offer").get_by_text("Leaver").wait_for())

        def customer_leaves():
            b.click("#endBtn")
            b.locator("#log").get_by_text("The chat has ended.").wait_for()
            a.wait_for_selector(".offer", state="detached")
            count(a.locator("#convs .conv"), 0, "conversations")
        self.step("the customer leaves; the offer goes", customer_leaves)

    def agent_reconnect_resyncs(self):
        """The console's network drops; meanwhile its chat ends and its pending offer is
        withdrawn. Back online it shows the chat ended, no stale offer, and the agent's state."""
        proxy = Proxy(self.base)
        a, b, b2 = self.page("agent"), self.page("widget"), self.page("widget2")
        self.step("agent ready", lambda: agent_ready(a, f"{proxy.url}/demo/agent"))
        self.step("customer starts", lambda: customer_starts(b, f"{self.base}/demo/widget", "First", "hi"))
        self.step("agent accepts", lambda: accept(a))

        def second_offer():
            customer_starts(b2, f"{self.base}/demo/widget", "Second")
            a.locator(".offer").get_by_text("Second").wait_for()
        self.step("a second customer's offer rings", second_offer)

        def drop():
            proxy.cut()
            wait_text(a, "#status", "reconnecting…")
            for page in (b, b2):
                page.click("#endBtn")
                page.locator("#log").get_by_text("The chat has ended.").wait_for()
        self.step("the console drops; both customers leave meanwhile", drop)

        def resynced():
            proxy.restore()
            a.locator("#convs").get_by_text("First (ended)").wait_for()
            a.wait_for_selector("#completeBtn[disabled]", state="attached")
            a.wait_for_selector(".offer", state="detached")
            wait_text(a, "#status", "ready")
        self.step("back online: the chat ended, no offer, the agent ready", resynced)

    def agent_reply_while_down(self):
        """A reply typed while the console's socket is down is kept, not lost; sent once back."""
        proxy = Proxy(self.base)
        a, b = self.page("agent"), self.page("widget")
        self.step("agent ready", lambda: agent_ready(a, f"{proxy.url}/demo/agent"))
        self.step("customer starts", lambda: customer_starts(b, f"{self.base}/demo/widget", "Cust", "hi"))
        self.step("agent accepts", lambda: accept(a))

        def type_while_down():
            proxy.cut()
            wait_text(a, "#status", "reconnecting…")
            a.fill("#text", "typed while offline")
            a.press("#text", "Enter")
            if a.input_value("#text") != "typed while offline":
                raise PlaywrightError("the reply typed while offline was cleared, not sent")
        self.step("a reply typed offline stays in the box", type_while_down)

        def sent_once_back():
            proxy.restore()
            a.wait_for_selector("#sendBtn:not([disabled])")
            a.press("#text", "Enter")
            b.locator("#log").get_by_text("typed while offline").wait_for()
            b.wait_for_timeout(500)
            count(b.locator("#log").get_by_text("typed while offline"), 1, "the reply")
        self.step("back online it is sent, once", sent_once_back)

    def widget_send_while_down(self):
        """The widget's network drops: a message that could not be sent stays in the box and is
        sent once when back; the agent's reply meanwhile arrives once after the reconnect."""
        proxy = Proxy(self.base)
        a, b = self.page("agent"), self.page("widget")
        self.step("agent ready", lambda: agent_ready(a, f"{self.base}/demo/agent"))
        self.step("customer starts", lambda: customer_starts(b, f"{proxy.url}/demo/widget", "Cust", "hi"))
        self.step("agent accepts", lambda: accept(a))

        def send_while_down():
            proxy.cut()
            wait_text(b, "#status", "reconnecting…")
            a.fill("#text", "reply while you were away")
            a.press("#text", "Enter")
            a.locator("#log").get_by_text("reply while you were away").wait_for()
            b.fill("#text", "sent while offline")
            b.press("#text", "Enter")
            wait_contains(b, "#status", "error")
            if b.input_value("#text") != "sent while offline":
                raise PlaywrightError("the message that failed to send was cleared")
        self.step("a message that fails to send stays in the box", send_while_down)

        def back():
            proxy.restore()
            wait_text(b, "#status", "connected")
            b.locator("#log").get_by_text("reply while you were away").wait_for()
            b.press("#text", "Enter")
            a.locator("#log").get_by_text("sent while offline").wait_for()
            b.wait_for_timeout(500)
            count(b.locator("#log").get_by_text("reply while you were away"), 1, "the agent's reply")
            count(b.locator("#log").get_by_text("sent while offline"), 1, "the customer's message")
            count(b.locator("#log").get_by_text("hi", exact=True), 1, "the first message")
        self.step("back online: resumed without loss or repeat, the message sent once", back)

    def start_double_click(self):
        """A double click on Start opens one chat with one socket."""
        a, b = self.page("agent"), self.page("widget")
        sockets = []
        b.on("websocket", lambda ws: sockets.append(ws.url))
        self.step("agent ready", lambda: agent_ready(a, f"{self.base}/demo/agent"))

        def slow_start(route):
            # A network's latency: the second click comes while the first start is out.
            starts.append(route.request.url)
            time.sleep(0.3)
            route.continue_()

        starts = []
        b.route("**/nexus/v3/chat/sessions", slow_start)

        def double_click():
            b.goto(f"{self.base}/demo/widget")
            wait_text(b, "#status", "ready")
            b.fill("#nickname", "Double")
            b.dblclick("#startBtn")
            wait_text(b, "#status", "connected")
            b.wait_for_timeout(1000)
            if len(starts) != 1 or len(sockets) != 1:
                raise PlaywrightError(f"{len(starts)} starts, {len(sockets)} sockets: {sockets}")
        self.step("a double click on Start opens one socket", double_click)

    def same_text_twice(self):
        """The same text sent twice quickly, the first still out, is two messages: the widget's
        "ok" twice (its sends held, as by a network's latency) reaches the console twice, and
        the agent's "ok" twice (the second sent before the first's ack) reaches the widget twice."""
        a, b = self.page("agent"), self.page("widget")
        self.step("agent ready", lambda: agent_ready(a, f"{self.base}/demo/agent"))
        self.step("customer starts", lambda: customer_starts(b, f"{self.base}/demo/widget", "Cust", "hi"))
        self.step("agent accepts", lambda: accept(a))

        # A network's latency: each send is held (not answered) until both are out, so the
        # second comes while the first is still in flight.
        sends = []

        def hold(route):
            sends.append(route)
        b.route("**/messages", hold)

        def customer_twice():
            for n in (1, 2):
                b.fill("#text", "ok from the customer")
                b.press("#text", "Enter")
                b.wait_for_function("document.getElementById('text').value === ''")
                deadline = time.time() + 5
                while len(sends) < n and time.time() < deadline:
                    b.wait_for_timeout(50)
            for route in sends:
                route.continue_()
            b.unroute("**/messages")
            a.locator("#log").get_by_text("ok from the customer").nth(1).wait_for()
            a.wait_for_timeout(500)
            count(a.locator("#log").get_by_text("ok from the customer"), 2, "the customer's ok")
            if len(sends) != 2:
                raise PlaywrightError(f"{len(sends)} sends, 2 expected")
        self.step("the customer sends the same text twice quickly: shown twice", customer_twice)

        def agent_twice():
            # Both sent in one turn of the page's loop: the first's ack cannot come between.
            a.evaluate("""() => { for (let i = 0; i < 2; i++) {
                document.getElementById('text').value = 'ok from the agent';
                document.getElementById('reply').requestSubmit(); } }""")
            b.locator("#log").get_by_text("ok from the agent").nth(1).wait_for()
            b.wait_for_timeout(500)
            count(b.locator("#log").get_by_text("ok from the agent"), 2, "the agent's ok")
        self.step("the agent sends the same reply twice quickly: shown twice", agent_twice)

    def transfer_refused(self):
        """A transfer or consult the worker refuses is shown, with its reason."""
        a, b = self.page("agent"), self.page("widget")
        self.step("agent ready", lambda: agent_ready(a, f"{self.base}/demo/agent"))
        self.step("customer starts", lambda: customer_starts(b, f"{self.base}/demo/widget", "Cust", "hi"))
        self.step("agent accepts", lambda: accept(a))

        def refused():
            # The second agent never went ready.
            a.select_option("#target", label="Agent: Second Agent")
            a.click("#transferBtn")
            a.locator("#log").get_by_text("Transfer failed: AGENT_NOT_AVAILABLE").wait_for()
            a.click("#consultBtn")
            a.locator("#log").get_by_text("Consult failed: AGENT_NOT_AVAILABLE").wait_for()
            a.wait_for_selector("#completeBtn:not([disabled])")
        self.step("a refused transfer and consult are shown", refused)

    def long_transcript(self):
        """A chat longer than one transcript page: the agent sees its end on accept."""
        a, b = self.page("agent"), self.page("widget")
        self.step("agent ready", lambda: agent_ready(a, f"{self.base}/demo/agent"))
        self.step("customer starts", lambda: customer_starts(b, f"{self.base}/demo/widget", "Talker"))

        def many():
            # Through the widget's own session: 150 messages, one at a time.
            b.evaluate("""async () => {
                for (let i = 1; i <= 150; i++) {
                    const r = await fetch(`/nexus/v3/chat/sessions/${session.session_id}/messages`, {
                        method: 'POST',
                        headers: {'content-type': 'application/json', 'x-api-key': cfg.api_key,
                                  'x-nexus-client-key': session.client_key},
                        body: JSON.stringify({text: `line ${i}.`})});
                    if (r.status !== 202) throw new Error('send ' + r.status);
                }
            }""")
            b.locator("#log").get_by_text("line 150.").wait_for()
        self.step("the customer writes 150 lines", many)

        def sees_all():
            accept(a)
            a.locator("#log").get_by_text("line 150.").wait_for()
            count(a.locator("#log").get_by_text("line 1.", exact=False), 1, "the first line")
        self.step("the agent sees the first and the last", sees_all)

    def typing_cleared(self):
        """An agent typing leaves no 'is typing' on the widget once it is gone: when it
        completes, when the customer ends the chat, when a consultant leaves."""
        a, b, c = self.page("agent"), self.page("widget"), self.page("second-agent")
        self.step("agent ready", lambda: agent_ready(a, f"{self.base}/demo/agent"))

        def agent_types(a=a):
            # As a desk does: the agent API's typing.
            a.evaluate("""async () => {
                const r = await fetch(`/v1/agent/conversations/${current}/typing`, {method: 'POST',
                    headers: {'content-type': 'application/json', authorization: `Bearer ${token}`},
                    body: JSON.stringify({state: 'started'})});
                if (r.status !== 202) throw new Error('typing ' + r.status);
            }""")
            wait_contains(b, "#typing", "is typing")

        def agent_completes():
            customer_starts(b, f"{self.base}/demo/widget", "Cust", "hi")
            accept(a)
            agent_types()
            a.click("#completeBtn")
            b.locator("#log").get_by_text("The chat has ended.").wait_for()
            wait_text(b, "#typing", "")
        self.step("the agent types, then completes: no typing left", agent_completes)

        def customer_ends():
            customer_starts(b, f"{self.base}/demo/widget", "Cust", "again")
            accept(a)
            agent_types()
            b.click("#endBtn")
            b.locator("#log").get_by_text("The chat has ended.").wait_for()
            wait_text(b, "#typing", "")
        self.step("the agent types, the customer ends: no typing left", customer_ends)

        def consultant_leaves():
            agent_ready(c, f"{self.base}/demo/agent?agent=1")
            customer_starts(b, f"{self.base}/demo/widget", "Cust", "third")
            accept(a)
            a.select_option("#target", label="Agent: Second Agent")
            a.click("#consultBtn")
            c.locator(".offer .accept").first.click()
            c.wait_for_selector("#leaveBtn", state="visible")
            agent_types(c)
            c.click("#leaveBtn")
            b.locator("#log").get_by_text("Second Agent left").wait_for()
            wait_text(b, "#typing", "")
        self.step("a consultant types, then leaves: no typing left", consultant_leaves)

    def key_renewal(self):
        """A chat outlives its client key (run with chat.client_key_ttl_s = 1: keys are taken
        60 s past that, the edges' clock skew): the widget renews it, sends and receives."""
        a, b = self.page("agent"), self.page("widget")
        self.step("agent ready", lambda: agent_ready(a, f"{self.base}/demo/agent"))
        self.step("customer starts", lambda: customer_starts(b, f"{self.base}/demo/widget", "Cust", "hi"))
        self.step("agent accepts", lambda: accept(a))
        self.step("the first key expires", lambda: b.wait_for_timeout(65_000))

        def still_chatting():
            b.fill("#text", "still here")
            b.press("#text", "Enter")
            a.locator("#log").get_by_text("still here").wait_for()
            a.fill("#text", "welcome back")
            a.press("#text", "Enter")
            b.locator("#log").get_by_text("welcome back").wait_for()
        self.step("the customer sends and receives with a renewed key", still_chatting)

    def refusals_shown(self):
        """4xx answers reach the user with their code, and what was typed stays
        (run with chat.max_message_chars = 20 and chat.file_retention_s = 1)."""
        a, b = self.page("agent"), self.page("widget")
        long = "this text is longer than twenty characters"
        self.step("agent ready", lambda: agent_ready(a, f"{self.base}/demo/agent"))
        self.step("customer starts", lambda: customer_starts(b, f"{self.base}/demo/widget", "Cust", "hi"))
        self.step("agent accepts", lambda: accept(a))

        def too_long():
            a.fill("#text", long)
            a.press("#text", "Enter")
            wait_contains(a, "#status", "MESSAGE_TOO_LONG")
            if a.input_value("#text") != long:
                raise PlaywrightError("the agent's refused reply was cleared")
            b.fill("#text", long)
            b.press("#text", "Enter")
            wait_contains(b, "#status", "MESSAGE_TOO_LONG")
            if b.input_value("#text") != long:
                raise PlaywrightError("the customer's refused message was cleared")
        self.step("a message too long is refused with its code and kept", too_long)

        def expired_download():
            b.set_input_files("#file", files=[{"name": "old.txt", "mimeType": "text/plain",
                                               "buffer": b"old\n"}])
            a.locator("#log").get_by_text("old.txt").wait_for()
            b.wait_for_timeout(2500)
            b.locator("#log").get_by_text("old.txt").click()
            wait_contains(b, "#status", "FILE_EXPIRED")
            a.locator("#log").get_by_text("old.txt").click()
            wait_contains(a, "#status", "FILE_EXPIRED")
        self.step("an expired file's download says FILE_EXPIRED", expired_download)

    def widget_reload_resumes(self):
        """A reload (or leaving the page and coming back in the same tab) resumes the chat: the
        transcript is back, what came meanwhile is shown once, and both sides go on."""
        a, b = self.page("agent"), self.page("widget")
        widget = f"{self.base}/demo/widget"
        self.step("agent ready", lambda: agent_ready(a, f"{self.base}/demo/agent"))
        self.step("customer starts", lambda: customer_starts(b, widget, "Cust", "hi"))

        def replies():
            accept(a)
            a.fill("#text", "before the reload")
            a.press("#text", "Enter")
            b.locator("#log").get_by_text("before the reload").wait_for()
        self.step("the agent accepts and replies", replies)

        def reload():
            b.reload()
            wait_text(b, "#status", "connected")
            b.locator("#log").get_by_text("before the reload").wait_for()
            b.wait_for_selector("#start", state="hidden")
            b.wait_for_timeout(500)
            count(b.locator("#log").get_by_text("hi", exact=True), 1, "the first message")
            count(b.locator("#log").get_by_text("before the reload"), 1, "the reply")
        self.step("a reload shows the chat again, once", reload)

        def away_and_back():
            b.goto("about:blank")
            a.fill("#text", "while you were away")
            a.press("#text", "Enter")
            a.locator("#log").get_by_text("while you were away").wait_for()
            b.goto(widget)
            wait_text(b, "#status", "connected")
            b.locator("#log").get_by_text("while you were away").wait_for()
            b.fill("#text", "back again")
            b.press("#text", "Enter")
            a.locator("#log").get_by_text("back again").wait_for()
            a.fill("#text", "welcome back")
            a.press("#text", "Enter")
            b.locator("#log").get_by_text("welcome back").wait_for()
            b.wait_for_timeout(500)
            for text in ("before the reload", "while you were away", "back again", "welcome back"):
                count(b.locator("#log").get_by_text(text), 1, text)
        self.step("away and back: what came meanwhile once, and the chat goes on", away_and_back)

        def refused_key_dropped():
            # A key the edge no longer takes (here one that was never valid: 403).
            b.evaluate("""() => {
                for (const k of Object.keys(sessionStorage)) {
                    const s = JSON.parse(sessionStorage.getItem(k));
                    sessionStorage.setItem(k, JSON.stringify({ ...s, client_key: 'not-a-key' }));
                }
            }""")
            b.reload()
            b.locator("#log").get_by_text("Your previous chat is over").wait_for()
            b.wait_for_selector("#start", state="visible")
            b.wait_for_selector("#send", state="hidden")
            if b.evaluate("sessionStorage.length") != 0:
                raise PlaywrightError("the refused session is still kept")
        self.step("a kept session whose key is refused is dropped: the start form", refused_key_dropped)

    def widget_new_chat(self):
        """After a chat ends the widget offers a new one, without a reload; an ended chat is
        not resumed by a reload."""
        a, b = self.page("agent"), self.page("widget")
        self.step("agent ready", lambda: agent_ready(a, f"{self.base}/demo/agent"))
        self.step("customer starts",
                  lambda: customer_starts(b, f"{self.base}/demo/widget", "First", "first chat"))
        first = []

        def ends():
            first.append(b.evaluate("session.session_id"))
            b.click("#endBtn")
            b.locator("#log").get_by_text("The chat has ended.").wait_for()
            b.wait_for_selector("#againBtn", state="visible")
        self.step("the customer ends: a new chat is offered", ends)

        def second():
            b.click("#againBtn")
            b.wait_for_selector("#start", state="visible")
            count(b.locator("#log").get_by_text("first chat"), 0, "the first chat's messages")
            b.fill("#nickname", "Again")
            b.click("#startBtn")
            wait_text(b, "#status", "connected")
            b.fill("#text", "second chat")
            b.press("#text", "Enter")
            a.locator(".offer").get_by_text("Again").wait_for()
            accept(a)
            a.locator("#log").get_by_text("second chat").wait_for()
            if b.evaluate("session.session_id") == first[0]:
                raise PlaywrightError("the new chat is the old session")
        self.step("a new chat starts and reaches the agent", second)

        def ended_not_resumed():
            a.click("#completeBtn")
            b.locator("#log").get_by_text("The chat has ended.").wait_for()
            b.reload()
            wait_text(b, "#status", "ready")
            b.wait_for_selector("#start", state="visible")
            count(b.locator("#log .entry"), 0, "entries after the reload")
        self.step("a reload after the end shows the start form", ended_not_resumed)

    def widget_api_key_disabled(self):
        """The site's API key is disabled under an open stream (4003): the widget says the chat
        can't continue and stops reconnecting (run with stores.auth_cache_ttl_ms = 1000)."""
        b = self.page("widget")
        opened = sockets_of(b)
        self.step("customer starts", lambda: customer_starts(b, f"{self.base}/demo/widget", "Cust", "hi"))

        def disabled():
            for key in self.admin("GET", "/api-keys")["items"]:
                self.admin("PATCH", f"/api-keys/{key['id']}", {"enabled": False})
            b.locator("#log").get_by_text("The chat can't continue").wait_for()
            wait_contains(b, "#log", "API_KEY_DISABLED")
            b.wait_for_selector("#send", state="hidden")
            no_new_sockets(b, opened, "after 4003")
        self.step("the key is disabled: the chat can't continue, no reconnects", disabled)

    def agent_token_rotated(self):
        """The agent's token is rotated under an open console (4001): it says to sign in again
        and stops reconnecting; loaded again with the old token, it says so at once (run with
        stores.auth_cache_ttl_ms = 1000)."""
        a = self.page("agent")
        opened = sockets_of(a)
        self.step("agent ready", lambda: agent_ready(a, f"{self.base}/demo/agent"))

        def rotated():
            agent = a.evaluate("me.id")
            self.admin("POST", f"/agents/{agent}/token")
            wait_contains(a, "#status", "sign in again")
            wait_contains(a, "#status", "AGENT_TOKEN_REVOKED")
            a.wait_for_selector("#ready[disabled]", state="attached")
            no_new_sockets(a, opened, "after 4001")
        self.step("the token is rotated: sign in again, no reconnects", rotated)

        def old_token():
            before = len(opened)
            a.reload()
            wait_contains(a, "#status", "sign in again")
            if len(opened) != before + 1:
                raise PlaywrightError(f"{len(opened) - before} sockets tried, 1 expected")
            no_new_sockets(a, opened, "with a refused token")
        self.step("loaded with the old token: sign in again, no reconnects", old_token)

    def agent_drafts(self):
        """Each chat keeps its own draft in the console: switching chats swaps the reply box."""
        a, b, b2 = self.page("agent"), self.page("widget"), self.page("widget2")
        self.step("agent ready", lambda: agent_ready(a, f"{self.base}/demo/agent"))

        def two_chats():
            customer_starts(b, f"{self.base}/demo/widget", "First", "hi from first")
            a.locator(".offer").get_by_text("First").wait_for()
            accept(a)
            customer_starts(b2, f"{self.base}/demo/widget", "Second", "hi from second")
            a.locator(".offer").get_by_text("Second").wait_for()
            a.locator(".offer .accept").first.click()
            a.locator("#log").get_by_text("hi from second").wait_for()
        self.step("the agent holds two chats", two_chats)

        def show(name, draft):
            a.locator("#convs .conv").get_by_text(name).click()
            a.locator("#log").get_by_text(f"hi from {name.lower()}").wait_for()
            if a.input_value("#text") != draft:
                raise PlaywrightError(f"{name}'s box holds {a.input_value('#text')!r}, not {draft!r}")

        def drafts():
            show("First", "")
            a.fill("#text", "draft for first")
            show("Second", "")
            a.fill("#text", "draft for second")
            show("First", "draft for first")
            show("Second", "draft for second")
            a.press("#text", "Enter")
            b2.locator("#log").get_by_text("draft for second").wait_for()
            show("First", "draft for first")
            a.press("#text", "Enter")
            b.locator("#log").get_by_text("draft for first").wait_for()
            count(b.locator("#log").get_by_text("draft for second"), 0, "the other chat's reply")
        self.step("each chat keeps its own draft", drafts)

    def offer_countdown(self):
        """An offer shows the seconds it has left; at 0 by the page's clock (here one a minute
        fast) it stays until the server closes it, and can still be accepted."""
        a, fast, b = self.page("agent"), self.page("agent-fast-clock"), self.page("widget")
        fast.add_init_script("(() => { const now = Date.now; Date.now = () => now() + 60000; })()")

        def both_ready():
            agent_ready(a, f"{self.base}/demo/agent")
            agent_ready(fast, f"{self.base}/demo/agent")
        self.step("the agent's two consoles are ready", both_ready)
        self.step("customer starts", lambda: customer_starts(b, f"{self.base}/demo/widget", "Cust", "hi"))

        def left(page):
            text = page.locator(".offer .left").first.text_content()
            if not text.endswith(" s left"):
                raise PlaywrightError(f"no countdown: {text!r}")
            return int(text.split()[0])

        def counts_down():
            a.locator(".offer").get_by_text("Cust").wait_for()
            first = left(a)
            if not 10 <= first <= 20:
                raise PlaywrightError(f"{first} s left of a 20 s offer")
            # A second later, or a little more on a busy machine.
            a.wait_for_function("n => parseInt(document.querySelector('.offer .left').textContent) < n",
                                arg=first, timeout=5000)
        self.step("the offer counts down its seconds", counts_down)

        def kept_at_zero():
            fast.locator(".offer").get_by_text("Cust").wait_for()
            wait_contains(fast, ".offer .left", "expiring")
            fast.wait_for_timeout(1000)
            count(fast.locator(".offer"), 1, "offers past their time by the page's clock")
            accept(fast)
            fast.locator("#log").get_by_text("hi").wait_for()
        self.step("at 0 by the page's clock it stays, and the accept goes through", kept_at_zero)

    def typing_both_ways(self):
        """The console tells the customer when the agent types (one `started` per burst, a
        `stopped` after a pause) and shows the customer typing."""
        a, b = self.page("agent"), self.page("widget")
        sent = []
        a.on("websocket", lambda ws: ws.on("framesent", lambda f: sent.append(f)))
        self.step("agent ready", lambda: agent_ready(a, f"{self.base}/demo/agent"))
        self.step("customer starts", lambda: customer_starts(b, f"{self.base}/demo/widget", "Cust", "hi"))
        self.step("agent accepts", lambda: accept(a))

        def typing_ops(state):
            return [f for f in sent if '"op":"typing"' in f and f'"state":"{state}"' in f]

        def agent_types():
            a.locator("#text").press_sequentially("an answer being written", delay=30)
            wait_contains(b, "#typing", "Demo Agent is typing")
            wait_text(b, "#typing", "")
            count(a.locator("#typing").get_by_text("Demo Agent"), 0, "the agent's own typing")
            # One burst: one of each (a keystroke held up 2 s by a busy machine may make two).
            started, stopped = len(typing_ops("started")), len(typing_ops("stopped"))
            if not 1 <= started <= 2 or stopped != started:
                raise PlaywrightError(f"typing ops sent: {[f for f in sent if 'typing' in f]}")
        self.step("the agent types: the customer sees it, one started and one stopped", agent_types)

        def reply_ends_it():
            a.locator("#text").press_sequentially(" now", delay=30)
            wait_contains(b, "#typing", "Demo Agent is typing")
            a.press("#text", "Enter")
            b.locator("#log").get_by_text("an answer being written now").wait_for()
            wait_text(b, "#typing", "")
        self.step("the agent's reply ends its typing", reply_ends_it)

        def customer_types():
            b.locator("#text").press_sequentially("a question", delay=30)
            wait_contains(a, "#typing", "Cust is typing")
            wait_text(a, "#typing", "")
        self.step("the customer types: the console shows it, then not", customer_types)


def main():
    if len(sys.argv) != 3:
        fail("usage: cases.py BASE_URL CASE")
    base, case = sys.argv[1], sys.argv[2]
    if not os.access(CHROMIUM, os.X_OK):
        fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (Debian's package)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            cases = Cases(base, browser)
            run = getattr(cases, case, None)
            if run is None or case.startswith("_"):
                fail(f"no case {case!r}")
            try:
                run()
            except PlaywrightError as e:
                print(f"cases.py: {case} FAILED at step '{cases.step_name}': "
                      + "\n".join(str(e).splitlines()[:6]), file=sys.stderr)
                for line in cases.logs[-30:]:
                    print(f"  {line}", file=sys.stderr)
                sys.exit(1)
        finally:
            browser.close()
    print(f"cases.py: {case} passed")


if __name__ == "__main__":
    main()
