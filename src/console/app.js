// muxi-rt console: plain JavaScript, no dependencies, no other host.
// Admin keys live in this tab's sessionStorage and leave it only as the
// X-Muxi-Admin-Key header of calls to this server's admin routes.
"use strict";
(function () {
  const STORE = "muxi.console.keys";
  const main = document.getElementById("main");
  const announcer = document.getElementById("announce");
  /** Cleanups of the page on screen (timers, streams), run when it changes. */
  let cleanups = [];

  function keys() {
    try {
      return JSON.parse(sessionStorage.getItem(STORE)) || {};
    } catch (e) {
      return {};
    }
  }
  function saveKeys(value) {
    sessionStorage.setItem(STORE, JSON.stringify(value));
  }
  function formationIds() {
    return Object.keys(keys()).sort();
  }

  /** Builds an element; text goes in as text, never as HTML. */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else el.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }
  function byId(id) {
    return document.getElementById(id);
  }
  function setText(id, text) {
    const el = byId(id);
    if (el) el.textContent = text === null || text === undefined || text === "" ? "—" : String(text);
  }
  function announce(text) {
    announcer.textContent = text;
  }
  function when(iso) {
    if (!iso) return "—";
    const date = new Date(iso);
    return isNaN(date) ? iso : date.toLocaleString();
  }
  function timeEl(iso) {
    return iso ? h("time", { datetime: iso }, when(iso)) : "—";
  }
  function field(labelText, input, hint) {
    return h("div", { class: "field" }, h("label", { for: input.id }, labelText), input, hint || null);
  }
  function message(text, ok) {
    return h("p", { class: ok ? "message ok" : "message", role: ok ? "status" : "alert" }, text);
  }

  class ApiError extends Error {
    constructor(status, code, text) {
      super(text);
      this.status = status;
      this.code = code;
    }
  }

  /** Calls `/api/{formation}/v1/admin{path}` with the formation's admin key. */
  async function api(formation, path, options) {
    const opts = options || {};
    const key = keys()[formation];
    if (!key) throw new ApiError(0, "not_signed_in", `Not signed in to formation ${formation}.`);
    const response = await fetch(`/api/${encodeURIComponent(formation)}/v1/admin${path}`, {
      method: opts.method || "GET",
      headers: { "X-Muxi-Admin-Key": key, Accept: "application/json" },
      credentials: "omit",
      cache: "no-store",
      signal: opts.signal,
    });
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (!response.ok) {
      const text = (body && body.message) || `HTTP ${response.status}`;
      throw new ApiError(response.status, body && body.code, text);
    }
    return body.data;
  }

  /** Runs `load` now and every `ms` until the page changes. */
  function poll(load, ms) {
    let timer = null;
    let stopped = false;
    const tick = async () => {
      try {
        await load();
      } finally {
        if (!stopped) timer = setTimeout(tick, ms);
      }
    };
    cleanups.push(() => {
      stopped = true;
      clearTimeout(timer);
    });
    tick();
  }

  /** Replaces `container`'s content when `data` changed, keeping keyboard focus. */
  function renderIfChanged(container, data, render) {
    const text = JSON.stringify(data);
    if (container.dataset.rendered === text) return;
    container.dataset.rendered = text;
    const focused = container.contains(document.activeElement) ? document.activeElement.id : null;
    container.replaceChildren(...[].concat(render(data)));
    if (focused && byId(focused)) byId(focused).focus();
  }

  /** Asks for confirmation in a modal dialog; resolves true on "Confirm". */
  function confirmAction(text, yesLabel) {
    const dialog = byId("confirm");
    byId("confirm-text").textContent = text;
    byId("confirm-yes").textContent = yesLabel;
    return new Promise((resolve) => {
      dialog.returnValue = "";
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
      dialog.showModal();
    });
  }

  function badge(status, id) {
    return h("span", { class: `badge s-${status}`, id: id || null }, status);
  }

  // -------------------------------------------------------------------------
  // Pages

  function heading(text) {
    document.title = `${text} · muxi-rt console`;
    return h("h1", {}, text);
  }

  function signinPage() {
    const notice = h("div", { id: "signin-notice" });
    const formation = h("input", { id: "signin-formation", name: "formation", required: true, autocomplete: "off", spellcheck: "false" });
    const key = h("input", { id: "signin-key", name: "key", type: "password", required: true, autocomplete: "off" });
    const form = h(
      "form",
      { id: "signin", class: "card", novalidate: true },
      field("Formation id", formation),
      field("Admin key", key),
      h("div", { class: "actions" }, h("button", { type: "submit", id: "signin-submit" }, "Sign in")),
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const id = formation.value.trim();
      const secret = key.value.trim();
      if (!id || !secret) {
        notice.replaceChildren(message("Give the formation id and its admin key."));
        return;
      }
      const saved = keys();
      saved[id] = secret;
      saveKeys(saved);
      try {
        await api(id, "/formation");
        key.value = "";
        location.hash = "#/formations";
      } catch (e) {
        delete saved[id];
        saveKeys(saved);
        notice.replaceChildren(message(`Cannot sign in to ${id}: ${e.message}`));
      }
    });
    const signedIn = formationIds();
    const list = h(
      "ul",
      { id: "signed-in" },
      signedIn.map((id) =>
        h(
          "li",
          {},
          h("strong", {}, id),
          " ",
          h(
            "button",
            {
              type: "button",
              class: "secondary",
              id: `signout-${id}`,
              onclick: () => {
                const saved = keys();
                delete saved[id];
                saveKeys(saved);
                announce(`Signed out of ${id}.`);
                route();
              },
            },
            `Sign out of ${id}`,
          ),
        ),
      ),
    );
    main.append(
      heading("Sign in"),
      h(
        "p",
        {},
        "Sign in with a formation's admin key; add more formations to see them together. ",
        "Keys stay in this browser tab (session storage) and are sent only as a header to this server; closing the tab forgets them.",
      ),
      notice,
      form,
      signedIn.length ? h("section", {}, h("h2", {}, "Signed in"), list) : null,
    );
  }

  function settingsList(settings) {
    const rows = [];
    const add = (name, value) => rows.push(h("dt", {}, name), h("dd", {}, value === null || value === undefined ? "—" : String(value)));
    add("Mode", settings.mode);
    add("Threshold", `${settings.threshold_seconds} s`);
    add("Webhook URL", settings.webhook_url);
    add("Webhook retries", settings.webhook_retries);
    add("Webhook timeout", `${settings.webhook_timeout} s`);
    add("Retention", `${settings.retention_days} days`);
    add("Concurrent requests", settings.max_concurrent_requests);
    if (settings.retry) add("Retry", `${settings.retry.max_attempts} attempts, ${settings.retry.initial_delay}–${settings.retry.max_delay} s`);
    if (settings.timeouts) add("Timeouts", `task ${settings.timeouts.task_timeout} s, workflow ${settings.timeouts.workflow_timeout} s`);
    return h("dl", {}, rows);
  }

  function formationCard(f) {
    return h(
      "section",
      { class: "card", id: `formation-${f.id}`, "aria-labelledby": `formation-title-${f.id}` },
      h("h2", { id: `formation-title-${f.id}` }, f.id, " ", badge(f.state, `state-${f.id}`)),
      f.description ? h("p", {}, f.description) : null,
      f.errors.length
        ? h(
            "div",
            { class: "errors", id: `errors-${f.id}` },
            h("p", {}, h("strong", {}, "The last edit has errors; the previous version keeps serving:")),
            h("ul", {}, f.errors.map((e) => h("li", {}, h("code", {}, e)))),
          )
        : null,
      h(
        "dl",
        {},
        h("dt", {}, "Version"),
        h("dd", {}, `${f.version} (${f.revision})`),
        h("dt", {}, "File"),
        h("dd", {}, h("code", {}, f.file)),
        h("dt", {}, "Loaded at"),
        h("dd", {}, timeEl(f.loaded_at)),
        h("dt", {}, "Folder read at"),
        h("dd", {}, timeEl(f.reloaded_at)),
        h("dt", {}, "Queue depth"),
        h("dd", { id: `queue-${f.id}` }, String(f.queue_depth)),
        h("dt", {}, "Running"),
        h("dd", { id: `running-${f.id}` }, String(f.running)),
      ),
      h("h3", {}, "Async settings"),
      settingsList(f.async),
      h("h3", {}, "Agents"),
      h("ul", {}, f.agents.map((a) => h("li", {}, h("code", {}, a.id), ` (${a.kind || "agent"})`, a.default ? " · default" : "", a.description ? ` — ${a.description}` : ""))),
      h("h3", {}, "Triggers"),
      f.triggers.length
        ? h("ul", {}, f.triggers.map((t) => h("li", {}, h("code", {}, t.name), t.description ? ` — ${t.description}` : "", t.fields.length ? ` (fields: ${t.fields.join(", ")})` : "")))
        : h("p", {}, "None."),
      h("p", {}, h("a", { href: `#/requests?formation=${encodeURIComponent(f.id)}`, id: `requests-of-${f.id}` }, `Requests of ${f.id}`)),
    );
  }

  function formationsPage() {
    const container = h("div", { class: "grid", id: "formations", "aria-live": "off" });
    const others = h("div", { id: "load-failures" });
    main.append(heading("Formations"), h("p", { class: "live" }, "Refreshed every 3 seconds."), others, container);
    poll(async () => {
      const ids = formationIds();
      const results = await Promise.all(
        ids.map((id) => api(id, "/formation").then((data) => ({ id, data }), (error) => ({ id, error: error.message }))),
      );
      renderIfChanged(container, results, (items) =>
        items.map((item) => (item.data ? formationCard(item.data) : h("section", { class: "card" }, h("h2", {}, item.id), message(item.error)))),
      );
      // Files that did not load at all (public in GET /health).
      let failures = [];
      try {
        const health = await (await fetch("/health", { cache: "no-store", credentials: "omit" })).json();
        failures = (health.data.failures || []).filter((f) => !f.still_serving || !ids.includes(f.still_serving));
        failures = failures.concat((health.data.problems || []).map((p) => ({ file: "", errors: [p] })));
      } catch (e) {
        failures = [];
      }
      renderIfChanged(others, failures, (list) =>
        list.length
          ? h(
              "section",
              { class: "card errors" },
              h("h2", {}, "Files that did not load"),
              h("ul", {}, list.flatMap((f) => f.errors.map((e) => h("li", {}, h("code", {}, e))))),
            )
          : [],
      );
    }, 3000);
  }

  const STATUSES = ["pending", "processing", "completed", "failed", "cancelled"];

  function localInput(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    if (isNaN(d)) return "";
    const pad = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
  }

  function requestsPage(params) {
    const ids = formationIds();
    const chosen = params.get("formation") || "";
    const select = (id, options, value) =>
      h("select", { id, name: id }, options.map(([v, label]) => h("option", { value: v, selected: v === value }, label)));
    const inputs = {
      formation: select("f-formation", [["", "All signed in"]].concat(ids.map((id) => [id, id])), chosen),
      status: select("f-status", [["", "Any"]].concat(STATUSES.map((s) => [s, s])), params.get("status") || ""),
      agent: h("input", { id: "f-agent", name: "agent", value: params.get("agent") || "", autocomplete: "off" }),
      user: h("input", { id: "f-user", name: "user", value: params.get("user") || "", autocomplete: "off" }),
      since: h("input", { id: "f-since", name: "since", type: "datetime-local", value: localInput(params.get("since")) }),
      until: h("input", { id: "f-until", name: "until", type: "datetime-local", value: localInput(params.get("until")) }),
    };
    const form = h(
      "form",
      { class: "filters", id: "filters", role: "search", "aria-label": "Filter requests" },
      field("Formation", inputs.formation),
      field("Status", inputs.status),
      field("Agent", inputs.agent),
      field("User", inputs.user),
      field("From", inputs.since),
      field("Until", inputs.until),
      h("div", { class: "actions" }, h("button", { type: "submit", id: "f-apply" }, "Apply"), h("button", { type: "button", class: "secondary", id: "f-clear", onclick: () => (location.hash = "#/requests") }, "Clear")),
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const q = new URLSearchParams();
      for (const name of ["formation", "status", "agent", "user"]) {
        const v = inputs[name].value.trim();
        if (v) q.set(name, v);
      }
      for (const name of ["since", "until"]) {
        const v = inputs[name].value;
        if (v && !isNaN(new Date(v))) q.set(name, new Date(v).toISOString());
      }
      location.hash = `#/requests?${q}`;
    });
    const notice = h("div", { id: "requests-notice" });
    const table = h("div", { id: "requests" });
    // Folded on narrow screens (unless a filter is set), so the list comes first.
    const filtered = ["formation", "status", "agent", "user", "since", "until"].some((name) => params.get(name));
    const open = filtered || window.matchMedia("(min-width: 40rem)").matches;
    const filters = h("details", { open, id: "filters-box" }, h("summary", {}, "Filters"), form);
    main.append(heading("Requests"), filters, h("p", { class: "live" }, "Newest first; refreshed every 2 seconds."), notice, table);

    const query = new URLSearchParams();
    for (const name of ["status", "agent", "user", "since", "until"]) if (params.get(name)) query.set(name, params.get(name));
    query.set("limit", "100");
    poll(async () => {
      const targets = chosen ? [chosen] : ids;
      const errors = [];
      const lists = await Promise.all(
        targets.map((id) =>
          api(id, `/requests?${query}`).then(
            (data) => data.requests,
            (error) => {
              errors.push(`${id}: ${error.message}`);
              return [];
            },
          ),
        ),
      );
      const rows = lists.flat().sort((a, b) => (a.created_at < b.created_at ? 1 : a.created_at > b.created_at ? -1 : 0)).slice(0, 100);
      renderIfChanged(notice, errors, (list) => list.map((e) => message(e)));
      renderIfChanged(table, rows, requestsTable);
    }, 2000);
  }

  function requestsTable(rows) {
    if (!rows.length) return h("p", { id: "no-requests" }, "No requests match.");
    const cell = (label, ...content) => h("td", { "data-label": label }, ...content);
    return h(
      "table",
      {},
      h("caption", { class: "visually-hidden" }, "Requests, newest first"),
      h("thead", {}, h("tr", {}, ["Created", "Formation", "Request", "User", "Agent", "Status", "Progress", "Step", "Webhook"].map((t) => h("th", { scope: "col" }, t)))),
      h(
        "tbody",
        {},
        rows.map((r) =>
          h(
            "tr",
            { "data-request-id": r.request_id },
            cell("Created", timeEl(r.created_at)),
            cell("Formation", r.formation_id),
            h("td", { "data-label": "Request", class: "id" }, h("a", { href: `#/request/${encodeURIComponent(r.formation_id)}/${encodeURIComponent(r.request_id)}`, id: `link-${r.request_id}` }, r.request_id)),
            cell("User", r.user_id),
            cell("Agent", r.agent_id),
            cell("Status", badge(r.status)),
            cell("Progress", h("span", { class: "progress" }, h("progress", { max: 100, value: r.progress, "aria-label": `Progress of ${r.request_id}` }), h("span", {}, `${Math.round(r.progress)}%`))),
            cell("Step", r.current_step || "—"),
            cell("Webhook", r.webhook ? h("span", { class: `s-${r.webhook.status}` }, `${r.webhook.status} (${r.webhook.attempts})`) : "—"),
          ),
        ),
      ),
    );
  }

  function requestPage(formation, rid) {
    const notice = h("div", { id: "request-notice" });
    const row = (label, id, content) => [h("dt", {}, label), h("dd", { id }, content || "—")];
    const buttons = {
      cancel: h("button", { type: "button", id: "cancel", class: "danger", hidden: true }, "Cancel request"),
      rerun: h("button", { type: "button", id: "rerun", hidden: true }, "Re-run with the same input"),
      retry: h("button", { type: "button", id: "retry-delivery", hidden: true }, "Retry delivery now"),
    };
    main.append(
      heading(`Request ${rid}`),
      h("p", {}, h("a", { href: `#/requests?formation=${encodeURIComponent(formation)}` }, `All requests of ${formation}`)),
      notice,
      h(
        "section",
        { class: "card", "aria-labelledby": "progress-title" },
        h("h2", { id: "progress-title" }, "Progress ", badge("pending", "status")),
        h("div", { class: "progress" }, h("progress", { id: "progress", max: 100, value: 0, "aria-labelledby": "progress-title" }), h("span", { id: "progress-text" }, "0%")),
        h("p", {}, "Current step: ", h("span", { id: "step" }, "—")),
        h("div", { class: "actions" }, buttons.cancel, buttons.rerun),
      ),
      h(
        "section",
        { class: "card" },
        h("h2", {}, "Details"),
        h(
          "dl",
          {},
          row("Formation", "d-formation", formation),
          row("User", "d-user"),
          row("Agent", "d-agent"),
          row("Session", "d-session"),
          row("Mode", "d-mode"),
          row("Attempts", "attempts"),
          row("Created", "d-created"),
          row("Started", "d-started"),
          row("Ended", "d-ended"),
          row("Duration", "d-duration"),
          row("Re-run of", "d-rerun-of"),
          row("Re-run as", "d-rerun-as"),
        ),
        h("h3", {}, "Input"),
        h("pre", { id: "input" }, "—"),
      ),
      h("section", { class: "card", id: "error-box", hidden: true }, h("h2", {}, "Error"), h("pre", { id: "error", class: "errors" })),
      h("section", { class: "card", id: "result-box", hidden: true }, h("h2", {}, "Result"), h("pre", { id: "result" }), h("h3", {}, "Artifacts"), h("div", { id: "artifacts" })),
      h(
        "section",
        { class: "card", "aria-labelledby": "delivery-title" },
        h("h2", { id: "delivery-title" }, "Webhook delivery"),
        h("p", { id: "no-delivery" }, "No webhook delivery (yet)."),
        h(
          "dl",
          { id: "delivery", hidden: true },
          row("Status", "delivery-status"),
          row("URL", "delivery-url"),
          row("Attempts", "delivery-attempts"),
          row("Last error", "delivery-error"),
          row("Next try", "delivery-next"),
        ),
        h("div", { class: "actions" }, buttons.retry),
      ),
    );

    let current = null;
    const link = (id) => h("a", { href: `#/request/${encodeURIComponent(formation)}/${encodeURIComponent(id)}` }, id);
    const setProgress = (value, step) => {
      if (typeof value === "number" && isFinite(value)) {
        byId("progress").value = value;
        setText("progress-text", `${Math.round(value)}%`);
      }
      if (step) setText("step", step);
    };
    const update = (r) => {
      const before = current && current.status;
      current = r;
      const status = byId("status");
      status.textContent = r.status;
      status.className = `badge s-${r.status}`;
      if (before && before !== r.status) announce(`Request ${r.status}.`);
      setProgress(r.progress, r.current_step);
      setText("d-user", r.user_id);
      setText("d-agent", r.agent_id);
      setText("d-session", r.session_id);
      setText("d-mode", r.processing_mode);
      setText("attempts", r.attempts);
      byId("d-created").replaceChildren(timeEl(r.created_at));
      byId("d-started").replaceChildren(timeEl(r.started_at));
      byId("d-ended").replaceChildren(timeEl(r.completed_at));
      setText("d-duration", r.duration_ms === null ? null : `${(r.duration_ms / 1000).toFixed(1)} s`);
      byId("d-rerun-of").replaceChildren(r.rerun_of ? link(r.rerun_of) : "—");
      byId("d-rerun-as").replaceChildren(...(r.rerun_as.length ? r.rerun_as.flatMap((id, i) => (i ? [", ", link(id)] : [link(id)])) : ["—"]));
      setText("input", r.input);
      byId("error-box").hidden = !r.error;
      if (r.error) setText("error", `${r.error.type}: ${r.error.message}`);
      byId("result-box").hidden = !r.result;
      if (r.result) {
        setText("result", r.result.text);
        const artifacts = r.result.artifacts || [];
        byId("artifacts").replaceChildren(artifacts.length ? h("ul", {}, artifacts.map((a) => h("li", {}, h("pre", {}, JSON.stringify(a, null, 2))))) : h("p", {}, "None."));
      }
      const d = r.delivery;
      byId("no-delivery").hidden = !!d;
      byId("delivery").hidden = !d;
      if (d) {
        setText("delivery-status", d.status);
        byId("delivery-status").className = `s-${d.status}`;
        setText("delivery-url", d.url);
        setText("delivery-attempts", d.attempts);
        setText("delivery-error", d.last_error);
        setText("delivery-next", d.next_attempt_at ? when(d.next_attempt_at) : null);
      }
      const final = ["completed", "failed", "cancelled"].includes(r.status);
      buttons.cancel.hidden = final;
      buttons.rerun.hidden = !(r.status === "failed" || r.status === "cancelled");
      buttons.retry.hidden = !(d && d.status !== "delivered");
    };
    const load = async () => {
      try {
        update(await api(formation, `/requests/${encodeURIComponent(rid)}`));
      } catch (e) {
        notice.replaceChildren(message(e.message));
      }
    };
    const act = async (question, yes, method, path, done) => {
      if (!(await confirmAction(question, yes))) return;
      try {
        const data = await api(formation, path, { method });
        notice.replaceChildren(done(data));
        announce(notice.textContent);
      } catch (e) {
        notice.replaceChildren(message(e.message));
      }
      await load();
    };
    buttons.cancel.addEventListener("click", () =>
      act(`Cancel request ${rid}? Its agent is stopped.`, "Cancel request", "DELETE", `/requests/${encodeURIComponent(rid)}`, () => message("The request was cancelled.", true)),
    );
    buttons.rerun.addEventListener("click", () =>
      act(`Run request ${rid} again, as a new request with the same input?`, "Re-run", "POST", `/requests/${encodeURIComponent(rid)}/rerun`, (data) =>
        h("p", { class: "message ok", role: "status" }, "Re-run as ", link(data.request_id), "."),
      ),
    );
    buttons.retry.addEventListener("click", () =>
      act(`Try the webhook delivery of ${rid} again now?`, "Retry delivery", "POST", `/deliveries/${encodeURIComponent(rid)}/retry`, () => message("The delivery will be tried again now.", true)),
    );

    poll(load, 2000);
    follow(formation, rid, (token) => {
      // The opening frame (it carries `status`) restates the record: the poll shows it.
      if (token.type === "progress" && token.status === undefined) setProgress(token.progress, token.content);
      else if (token.type === "progress") setProgress(token.progress, null);
      else if (token.type !== "content") load();
    });
  }

  /** Follows a request's Server-Sent Events with fetch(): the browser event-source API cannot send the key header. */
  function follow(formation, rid, onToken) {
    const controller = new AbortController();
    cleanups.push(() => controller.abort());
    const run = async () => {
      const key = keys()[formation];
      if (!key) return;
      try {
        const response = await fetch(`/api/${encodeURIComponent(formation)}/v1/admin/requests/${encodeURIComponent(rid)}/events`, {
          headers: { "X-Muxi-Admin-Key": key, Accept: "text/event-stream" },
          credentials: "omit",
          cache: "no-store",
          signal: controller.signal,
        });
        if (!response.ok || !response.body) return;
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const frame = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            const event = (frame.match(/^event: ?(.*)$/m) || [])[1];
            const data = frame
              .split("\n")
              .filter((line) => line.startsWith("data:"))
              .map((line) => line.slice(5).replace(/^ /, ""))
              .join("\n");
            if (event === "done") return;
            if (!data) continue;
            try {
              const parsed = JSON.parse(data);
              if (parsed.token) onToken(parsed.token);
            } catch (e) {
              /* a keep-alive or a frame we do not know */
            }
          }
        }
      } catch (e) {
        if (controller.signal.aborted) return;
      }
      // The stream dropped before the end: follow again shortly.
      if (!controller.signal.aborted) setTimeout(run, 1000);
    };
    run();
  }

  // -------------------------------------------------------------------------
  // Routing: #/signin, #/formations, #/requests?filters, #/request/{formation}/{id}

  function route() {
    for (const cleanup of cleanups.splice(0)) cleanup();
    const signedIn = formationIds().length > 0;
    const hash = location.hash.replace(/^#/, "") || (signedIn ? "/formations" : "/signin");
    const [path, query] = hash.split("?");
    const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
    let page = parts[0];
    if (!signedIn) page = "signin";
    main.replaceChildren();
    for (const a of document.querySelectorAll("[data-nav]")) {
      if (a.dataset.nav === page) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
    if (page === "formations") formationsPage();
    else if (page === "requests") requestsPage(new URLSearchParams(query || ""));
    else if (page === "request" && parts.length === 3) requestPage(parts[1], parts[2]);
    else signinPage();
  }

  window.addEventListener("hashchange", () => {
    route();
    main.focus();
  });
  route();
})();
