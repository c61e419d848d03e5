// The sagaline web UI: a list of workflows and one workflow's timeline, read from the
// JSON API of the server that serves this file. No framework and nothing fetched from
// elsewhere, so it works air-gapped. Every piece of data goes into the page as text
// (textContent, attribute values), never as HTML: ids, names and payloads are input.
"use strict";

(() => {
  const STATUSES = [
    "RUNNING", "STUCK", "COMPLETED", "FAILED", "COMPENSATED", "COMPENSATION_FAILED",
    "CANCELLED", "TERMINATED", "CONTINUED_AS_NEW",
  ];
  const OPEN = new Set(["RUNNING", "STUCK"]);
  const LIST_EVERY_MS = 5000;
  const DETAIL_EVERY_MS = 2000;
  const LIST_KEYS = ["type", "status", "id_prefix", "since", "until", "limit", "before"];

  // --- small helpers ---------------------------------------------------------------

  const byId = (id) => document.getElementById(id);

  // el("td", {class: "x", data: {id: 1}}, "text", child, [more]): strings become text.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "data") {
        for (const [k, v] of Object.entries(value)) node.dataset[k] = String(v);
      } else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    append(node, children);
    return node;
  }

  function append(node, children) {
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      if (Array.isArray(child)) append(node, child);
      else if (child instanceof Node) node.appendChild(child);
      else node.appendChild(document.createTextNode(String(child)));
    }
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  const pad = (n, width = 2) => String(n).padStart(width, "0");

  function fmtTime(ms) {
    if (ms === null || ms === undefined) return "";
    const d = new Date(ms);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function fmtPrecise(ms) {
    return `${fmtTime(ms)}.${pad(new Date(ms).getMilliseconds(), 3)}`;
  }

  function fmtDuration(ms) {
    const sign = ms < 0 ? "-" : "";
    let left = Math.abs(ms);
    if (left < 1000) return `${sign}${Math.round(left)} ms`;
    if (left < 60000) return `${sign}${(left / 1000).toFixed(left < 10000 ? 2 : 1)} s`;
    left = Math.round(left / 1000);
    const days = Math.floor(left / 86400);
    const hours = Math.floor((left % 86400) / 3600);
    const minutes = Math.floor((left % 3600) / 60);
    const seconds = left % 60;
    if (days) return `${sign}${days} d ${hours} h`;
    if (hours) return `${sign}${hours} h ${minutes} min`;
    return `${sign}${minutes} min ${seconds} s`;
  }

  // datetime-local values are local time; the API takes epoch milliseconds.
  function localInputToMs(value) {
    if (!value) return "";
    const ms = new Date(value).getTime();
    return Number.isFinite(ms) ? String(ms) : "";
  }

  function msToLocalInput(ms) {
    if (!ms) return "";
    const d = new Date(Number(ms));
    if (!Number.isFinite(d.getTime())) return "";
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function badge(status) {
    return el("span", {class: `badge status-${String(status).toLowerCase()}`}, status);
  }

  // A payload as the API gives it (JSON text, or a note for other encodings), shown
  // pretty-printed when it parses.
  function prettyPayload(text) {
    if (text === null || text === undefined) return "null";
    try {
      return JSON.stringify(JSON.parse(text), null, 2);
    } catch (_) {
      return String(text);
    }
  }

  function payloadBlock(label, text, open) {
    return el("details", {class: "payload", open: Boolean(open)},
      el("summary", {}, label),
      el("pre", {}, prettyPayload(text)));
  }

  class ApiError extends Error {}

  async function api(path, options) {
    let response;
    try {
      response = await fetch(path, options);
    } catch (err) {
      throw new ApiError(`the UI server cannot be reached (${err.message})`);
    }
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      throw new ApiError(`the UI server answered ${response.status} without JSON`);
    }
    if (!response.ok || !body || body.ok === false) {
      throw new ApiError((body && body.error) || `the UI server answered ${response.status}`);
    }
    return body;
  }

  // The id goes in the query, not the path: browsers drop the ids "." and ".." from a
  // path as dot segments (even percent-encoded), so /api/workflows/<id> cannot carry them.
  function workflowApi(id, action) {
    return `/api/workflow${action ? `/${action}` : ""}?id=${encodeURIComponent(id)}`;
  }

  // A new id for one signal: the same id is sent again when the same signal is resent
  // (after an answer that it was not confirmed), so the orchestrator applies it once.
  // crypto.randomUUID exists in secure contexts only (not on plain HTTP to a proxy name).
  function newSignalId() {
    if (window.crypto && typeof window.crypto.randomUUID === "function") {
      return window.crypto.randomUUID();
    }
    const bytes = window.crypto.getRandomValues(new Uint8Array(16));
    bytes[6] = (bytes[6] & 0x0f) | 0x40; // version 4
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant
    const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-` +
      `${hex.slice(16, 20)}-${hex.slice(20)}`;
  }

  function workflowHash(id, run) {
    const base = `#/workflow/${encodeURIComponent(id)}`;
    return run ? `${base}?run=${encodeURIComponent(run)}` : base;
  }

  function showError(node, message) {
    node.textContent = message || "";
    node.hidden = !message;
  }

  // --- routing ---------------------------------------------------------------------

  function currentRoute() {
    const hash = window.location.hash.replace(/^#/, "") || "/";
    const cut = hash.indexOf("?");
    const path = cut < 0 ? hash : hash.slice(0, cut);
    const params = new URLSearchParams(cut < 0 ? "" : hash.slice(cut + 1));
    const match = /^\/workflow\/(.+)$/.exec(path);
    if (match) {
      let id;
      try {
        id = decodeURIComponent(match[1]);
      } catch (_) {
        id = match[1];
      }
      return {view: "detail", id, run: params.get("run") || ""};
    }
    return {view: "list", params};
  }

  let timer = null;
  let generation = 0; // answers of an earlier view or refresh are dropped

  function schedule(fn, ms) {
    if (timer !== null) clearTimeout(timer);
    timer = setTimeout(fn, ms);
  }

  function render() {
    if (timer !== null) clearTimeout(timer);
    timer = null;
    generation += 1;
    const route = currentRoute();
    byId("list-view").hidden = route.view !== "list";
    byId("detail-view").hidden = route.view !== "detail";
    if (route.view === "list") showList(route.params);
    else showDetail(route.id, route.run);
  }

  // --- the list ----------------------------------------------------------------------

  // pages: the "before" cursor of each page reached with Older, the newest page ("")
  // first; gap: the current page was reached some other way (its address, Back), so
  // how many pages lie between is unknown.
  const listState = {params: new URLSearchParams(), pages: [""], gap: false};

  function pageIndex() {
    return listState.pages.indexOf(listState.params.get("before") || "");
  }
  let lastListHash = "#/";

  function listHash(params) {
    const kept = new URLSearchParams();
    for (const key of LIST_KEYS) {
      const value = params.get(key);
      if (value) kept.set(key, value);
    }
    const query = kept.toString();
    return query ? `#/?${query}` : "#/";
  }

  function fillFilterForm(params) {
    byId("f-type").value = params.get("type") || "";
    byId("f-status").value = params.get("status") || "";
    byId("f-id-prefix").value = params.get("id_prefix") || "";
    byId("f-since").value = msToLocalInput(params.get("since"));
    byId("f-until").value = msToLocalInput(params.get("until"));
    byId("f-limit").value = params.get("limit") || "50";
  }

  function paramsFromForm() {
    const params = new URLSearchParams();
    const pairs = [
      ["type", byId("f-type").value.trim()],
      ["status", byId("f-status").value],
      ["id_prefix", byId("f-id-prefix").value],
      ["since", localInputToMs(byId("f-since").value)],
      ["until", localInputToMs(byId("f-until").value)],
      ["limit", byId("f-limit").value === "50" ? "" : byId("f-limit").value],
    ];
    for (const [key, value] of pairs) if (value) params.set(key, value);
    return params;
  }

  function navigateList(params, keepPages) {
    if (!keepPages) {
      listState.pages = [""];
      listState.gap = false;
    }
    const hash = listHash(params);
    if (window.location.hash === hash || (hash === "#/" && !window.location.hash)) render();
    else window.location.hash = hash;
  }

  function showList(params) {
    listState.params = params;
    if (pageIndex() < 0) {
      listState.pages = ["", params.get("before")];
      listState.gap = true;
    }
    lastListHash = listHash(params);
    byId("back").setAttribute("href", lastListHash);
    fillFilterForm(params);
    loadList(generation);
  }

  async function loadList(gen) {
    const query = new URLSearchParams();
    for (const key of LIST_KEYS) {
      const value = listState.params.get(key);
      if (value) query.set(key, value);
    }
    try {
      const answer = await api(`/api/workflows?${query.toString()}`);
      if (gen !== generation) return;
      showError(byId("list-error"), "");
      drawChips(answer.counts, answer.total);
      drawRows(answer.workflows);
      drawPager(answer);
    } catch (err) {
      if (gen !== generation) return;
      showError(byId("list-error"), err.message);
    }
    if (gen === generation && byId("live").checked) {
      schedule(() => loadList(gen), LIST_EVERY_MS);
    }
  }

  function drawChips(counts, total) {
    const chips = byId("chips");
    clear(chips);
    const selected = listState.params.get("status") || "";
    const chip = (status, label, count) => el("button", {
      type: "button",
      class: `chip${status ? ` status-${status.toLowerCase()}` : ""}` +
        `${selected === status ? " selected" : ""}${count ? "" : " zero"}`,
      data: {status, count},
      "aria-pressed": selected === status ? "true" : "false",
      onclick: () => {
        const params = new URLSearchParams(listState.params);
        params.delete("before");
        if (status) params.set("status", status); else params.delete("status");
        navigateList(params, false);
      },
    }, el("span", {class: "chip-label"}, label), " ", el("span", {class: "chip-count"}, count));
    chips.appendChild(chip("", "All", total));
    for (const status of STATUSES) {
      const count = counts[status] || 0;
      if (count || status === selected || OPEN.has(status) || status === "COMPLETED") {
        chips.appendChild(chip(status, status, count));
      }
    }
    for (const [status, count] of Object.entries(counts)) {
      if (!STATUSES.includes(status) && count) chips.appendChild(chip(status, status, count));
    }
  }

  function drawRows(rows) {
    const body = byId("workflows").querySelector("tbody");
    clear(body);
    for (const row of rows) {
      const error = row.error_type
        ? `${row.error_type}${row.error_message ? `: ${row.error_message}` : ""}` : "";
      body.appendChild(el("tr", {data: {workflowId: row.workflow_id, status: row.status}},
        el("td", {class: "id", title: row.workflow_id},
          el("a", {href: workflowHash(row.workflow_id, "")}, row.workflow_id),
          row.archived ? el("span", {class: "tag", title: "its history record is gone"},
            "archived") : null),
        el("td", {class: "type"}, row.workflow_type),
        el("td", {}, badge(row.status)),
        el("td", {class: "time", title: fmtPrecise(row.started_at_ms)},
          fmtTime(row.started_at_ms)),
        el("td", {class: "time", title: fmtPrecise(row.updated_at_ms)},
          fmtTime(row.updated_at_ms)),
        el("td", {}, row.current_step || ""),
        el("td", {class: "num"}, row.attempts || ""),
        el("td", {class: "error-cell", title: error}, error)));
    }
    byId("empty").hidden = rows.length > 0;
  }

  function drawPager(answer) {
    const onFirst = !listState.params.get("before");
    byId("p-first").disabled = onFirst;
    byId("p-newer").disabled = onFirst;
    byId("p-older").disabled = !answer.next;
    byId("p-older").dataset.next = answer.next || "";
    const index = pageIndex();
    const page = index <= 0 ? "page 1" : listState.gap ? "an older page" : `page ${index + 1}`;
    byId("p-info").textContent = `${page}, ${answer.workflows.length} shown`;
  }

  function setUpList() {
    const status = byId("f-status");
    for (const name of STATUSES) status.appendChild(el("option", {value: name}, name));
    byId("filters").addEventListener("submit", (event) => {
      event.preventDefault();
      navigateList(paramsFromForm(), false);
    });
    byId("f-clear").addEventListener("click", () => navigateList(new URLSearchParams(), false));
    byId("p-first").addEventListener("click", () => {
      const params = new URLSearchParams(listState.params);
      params.delete("before");
      navigateList(params, false);
    });
    byId("p-older").addEventListener("click", () => {
      const next = byId("p-older").dataset.next;
      if (!next) return;
      const index = pageIndex();
      listState.pages = listState.pages.slice(0, index + 1);
      listState.pages.push(next);
      if (index === 0) listState.gap = false; // counted from the newest page again
      const params = new URLSearchParams(listState.params);
      params.set("before", next);
      navigateList(params, true);
    });
    byId("p-newer").addEventListener("click", () => {
      const params = new URLSearchParams(listState.params);
      const previous = listState.pages[Math.max(0, pageIndex() - 1)];
      if (previous) params.set("before", previous); else params.delete("before");
      navigateList(params, true);
    });
    byId("live").addEventListener("change", render);
  }

  // --- one workflow ------------------------------------------------------------------

  // signalId: the id of the signal the open form sends (new when the form opens or its
  // name or payload changes); acting: an action is in flight, so every button is off.
  const detailState = {id: "", run: "", answer: null, drawn: "", signalId: "", acting: false};

  function showDetail(id, run) {
    const changed = id !== detailState.id || run !== detailState.run;
    detailState.id = id;
    detailState.run = run;
    if (changed) {
      detailState.answer = null;
      detailState.drawn = "";
      byId("detail-body").hidden = true;
      byId("cancel-form").hidden = true;
      byId("signal-form").hidden = true;
      showError(byId("action-message"), "");
    }
    loadDetail(generation);
  }

  async function loadDetail(gen) {
    const query = detailState.run ? `&run=${encodeURIComponent(detailState.run)}` : "";
    let open = true;
    try {
      const answer = await api(`${workflowApi(detailState.id, "")}${query}`);
      if (gen !== generation) return;
      showError(byId("detail-error"), "");
      detailState.answer = answer;
      // Redrawn only when something changed, so an opened payload stays open.
      const wf = answer.workflow;
      const drawn = JSON.stringify([wf.run_id, wf.revision, wf.status, wf.updated_at_ms,
        answer.events.length, answer.runs.length, answer.latest_run_id]);
      if (drawn !== detailState.drawn) {
        detailState.drawn = drawn;
        drawDetail(answer);
      }
      open = OPEN.has(answer.workflow.status) ||
        answer.latest_run_id !== answer.workflow.run_id;
    } catch (err) {
      if (gen !== generation) return;
      showError(byId("detail-error"), err.message);
    }
    // A closed run changes no more; an open one (or a missing one, which the projector
    // may not have reached yet) is read again.
    if (gen === generation && byId("live").checked && open) {
      schedule(() => loadDetail(gen), DETAIL_EVERY_MS);
    }
  }

  // The projector's words for what an open run waits on, as a sentence part.
  function waitingOn(step) {
    if (step === "waiting") return "a signal or an update";
    if (step === "stuck") return "a fix, then a resume (STUCK)";
    return step;
  }

  function fact(label, ...value) {
    return [el("dt", {}, label), el("dd", {}, ...value)];
  }

  function drawDetail(answer) {
    const wf = answer.workflow;
    byId("detail-body").hidden = false;
    byId("wf-id").textContent = wf.workflow_id;
    const status = byId("wf-status");
    status.textContent = wf.status;
    status.className = `badge status-${wf.status.toLowerCase()}`;
    document.title = `${wf.workflow_id} · ${wf.status} · sagaline`;

    const facts = byId("wf-facts");
    clear(facts);
    const runSelect = el("select", {id: "run-select", "aria-label": "run"},
      answer.runs.map((r) => el("option", {value: r.run_id, selected: r.run_id === wf.run_id},
        `${r.run_id} · ${r.status} · ${fmtTime(r.started_at_ms)}` +
        `${r.run_id === answer.latest_run_id ? " (latest)" : ""}`)));
    runSelect.addEventListener("change", () => {
      const chosen = runSelect.value === answer.latest_run_id ? "" : runSelect.value;
      window.location.hash = workflowHash(wf.workflow_id, chosen);
    });
    const end = wf.closed_at_ms || null;
    append(facts, [
      fact("Type", wf.workflow_type),
      fact("Run", answer.runs.length > 1 ? runSelect : wf.run_id),
      fact("Started", fmtPrecise(wf.started_at_ms)),
      fact("Updated", fmtPrecise(wf.updated_at_ms)),
      end ? fact("Closed", fmtPrecise(end), ` (after ${fmtDuration(end - wf.started_at_ms)})`)
        : fact("Open for", fmtDuration(Date.now() - wf.started_at_ms)),
      wf.current_step ? fact("Waiting on", waitingOn(wf.current_step)) : null,
      wf.current_step && wf.attempts ? fact("Attempt", String(wf.attempts)) : null,
      wf.parent_workflow_id ? fact("Parent",
        el("a", {href: workflowHash(wf.parent_workflow_id, "")}, wf.parent_workflow_id)) : null,
      fact("Revision", String(wf.revision)),
      wf.archived ? fact("Archived", "its history record was removed by retention") : null,
    ]);

    const problem = byId("wf-problem");
    clear(problem);
    if (wf.error_type || wf.error_message) {
      const stuck = wf.status === "STUCK";
      problem.className = `problem${stuck ? " stuck" : ""}`;
      append(problem, [
        el("strong", {}, stuck ? "Stuck: " : "Failure: "),
        el("span", {class: "error-type"}, wf.error_type || ""),
        wf.error_message ? el("pre", {class: "error-message"}, wf.error_message) : null,
        stuck ? el("p", {class: "note"},
          "It waits with nothing lost. Deploy code that handles it, then Resume.") : null,
      ]);
      problem.hidden = false;
    } else {
      problem.hidden = true;
    }

    const payloads = byId("wf-payloads");
    clear(payloads);
    append(payloads, [
      payloadBlock("Input", wf.input, false),
      wf.result !== null && wf.result !== undefined ? payloadBlock("Result", wf.result, true) : null,
    ]);

    drawActions(answer);
    drawTimeline(answer);
  }

  function drawActions(answer) {
    const wf = answer.workflow;
    const latest = wf.run_id === answer.latest_run_id;
    const open = OPEN.has(wf.status);
    const usable = latest && open && !detailState.acting;
    byId("btn-cancel").disabled = !usable;
    byId("btn-signal").disabled = !usable;
    byId("btn-resume").disabled = !(usable && wf.status === "STUCK");
    byId("cancel-confirm").disabled = !usable;
    byId("signal-send").disabled = !usable;
    let note = "";
    if (!latest) note = "This is an earlier run: actions apply to the latest run only.";
    else if (!open) note = `Closed ${wf.status}: nothing more to do.`;
    else if (wf.status !== "STUCK") note = "Resume is for STUCK workflows.";
    byId("actions-note").textContent = note;
    if (!(latest && open)) {
      byId("cancel-form").hidden = true;
      byId("signal-form").hidden = true;
    }
  }

  // Buttons off while a request is in flight, so a double click sends one request.
  function setActing(acting) {
    detailState.acting = acting;
    for (const id of ["btn-cancel", "btn-signal", "btn-resume", "cancel-confirm", "signal-send"]) {
      if (acting) byId(id).disabled = true;
    }
    if (!acting && detailState.answer) drawActions(detailState.answer);
  }

  async function act(action, body) {
    const answer = detailState.answer;
    if (!answer || detailState.acting) return;
    const wf = answer.workflow;
    const message = byId("action-message");
    message.className = "message pending";
    message.textContent = `sending ${action}…`;
    message.hidden = false;
    setActing(true);
    try {
      const result = await api(workflowApi(wf.workflow_id, action), {
        method: "POST",
        headers: {"Content-Type": "application/json"},
        body: JSON.stringify({...body, run_id: wf.run_id}),
      });
      message.className = "message ok";
      message.textContent = result.message;
      byId("cancel-form").hidden = true;
      byId("signal-form").hidden = true;
      // Sent: the next signal from this page is another one.
      if (action === "signal") detailState.signalId = "";
    } catch (err) {
      // The signal form keeps its id: sending it again is applied once if the first
      // one arrived after all.
      message.className = "message failed";
      message.textContent = err.message;
    } finally {
      setActing(false);
    }
    // Read it again now, and keep reading while it is open: the projector shows the
    // effect within moments.
    render();
  }

  function setUpActions() {
    byId("btn-cancel").addEventListener("click", () => {
      byId("signal-form").hidden = true;
      byId("cancel-form").hidden = !byId("cancel-form").hidden;
      if (!byId("cancel-form").hidden) byId("cancel-reason").focus();
    });
    byId("btn-signal").addEventListener("click", () => {
      byId("cancel-form").hidden = true;
      byId("signal-form").hidden = !byId("signal-form").hidden;
      if (!byId("signal-form").hidden) {
        detailState.signalId = newSignalId();
        byId("signal-name").focus();
      }
    });
    // Another name or payload is another signal, with an id of its own.
    for (const id of ["signal-name", "signal-payload"]) {
      byId(id).addEventListener("input", () => {
        detailState.signalId = newSignalId();
      });
    }
    for (const button of document.querySelectorAll(".form-close")) {
      button.addEventListener("click", () => {
        button.closest("form").hidden = true;
      });
    }
    byId("btn-resume").addEventListener("click", () => act("resume", {}));
    byId("cancel-form").addEventListener("submit", (event) => {
      event.preventDefault();
      act("cancel", {reason: byId("cancel-reason").value});
    });
    byId("signal-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const name = byId("signal-name").value;
      const text = byId("signal-payload").value.trim() || "null";
      let payload;
      try {
        payload = JSON.parse(text);
      } catch (err) {
        const message = byId("action-message");
        message.className = "message failed";
        message.textContent = `the payload is not JSON: ${err.message}`;
        message.hidden = false;
        return;
      }
      if (!detailState.signalId) detailState.signalId = newSignalId();
      act("signal", {name, payload, signal_id: detailState.signalId});
    });
  }

  // --- the timeline ------------------------------------------------------------------

  // Events that belong to a step carry its seq; they are shown together, where the step
  // began. The others (signals, cancel requests, updates, patches) stand alone.
  function timelineItems(events) {
    const items = [];
    const steps = new Map();
    for (const event of events) {
      if (event.seq === null || event.seq === undefined) {
        items.push({event});
        continue;
      }
      let step = steps.get(event.seq);
      if (!step) {
        step = {seq: event.seq, events: []};
        steps.set(event.seq, step);
        items.push({step});
      }
      step.events.push(event);
    }
    return items;
  }

  function describeStep(step) {
    const first = step.events[0];
    const scheduled = step.events.find((e) => e.kind === "ActivityScheduled");
    if (scheduled) {
      const detail = scheduled.detail || {};
      if (detail.child_workflow_id) {
        return {kind: "child", label: "child workflow", name: detail.child_workflow_id,
          link: detail.child_workflow_id};
      }
      return detail.compensation
        ? {kind: "compensation", label: "compensation", name: scheduled.name}
        : {kind: "activity", label: "activity", name: scheduled.name};
    }
    if (first.kind.startsWith("Timer")) return {kind: "timer", label: "timer", name: ""};
    if (first.kind.startsWith("Promise")) {
      const created = step.events.find((e) => e.kind === "PromiseCreated");
      return {kind: "promise", label: "promise", name: created ? created.name : ""};
    }
    return {kind: "step", label: first.kind, name: first.name || ""};
  }

  function stepOutcome(step, open) {
    const last = step.events[step.events.length - 1];
    switch (last.kind) {
      case "ActivityCompleted": return "completed";
      case "ActivityFailed": return last.detail && last.detail.retry_at_ms ? "retrying" : "failed";
      case "TimerFired": return "fired";
      case "TimerCancelled": return "cancelled";
      case "PromiseCompleted": return last.detail && last.detail.failure ? "failed" : "completed";
      default: return open ? "waiting" : "unfinished";
    }
  }

  function failureText(failure) {
    if (!failure) return "";
    return `${failure.error_type}${failure.message ? `: ${failure.message}` : ""}`;
  }

  // What one event says, as a line of text and optional blocks below it.
  function describeEvent(event) {
    const d = event.detail || {};
    const attempt = event.attempt ? `attempt ${event.attempt}` : "";
    switch (event.kind) {
      case "ActivityScheduled": {
        const retry = d.max_attempts > 1 ? ` (of at most ${d.max_attempts})` : "";
        const wait = d.backoff_ms ? `, after a ${fmtDuration(d.backoff_ms)} backoff` : "";
        return {text: `${attempt} sent${retry}${wait}`,
          blocks: [payloadBlock("arguments", d.payload, false)]};
      }
      case "AttemptStarted": return {text: `${attempt} started by the participant`};
      case "AttemptHeartbeat": return {text: `${attempt} heartbeat`,
        blocks: d.details ? [payloadBlock("details", d.details, false)] : []};
      case "ActivityCompleted": return {text: `${attempt} completed`,
        blocks: [payloadBlock("result", d.result, false)]};
      case "ActivityFailed": {
        const failure = d.failure || {};
        const then = d.retry_at_ms ? `; retry at ${fmtPrecise(d.retry_at_ms)}`
          : "; no more attempts";
        const kind = failure.retryable ? "retryable" : "not retryable";
        return {text: `${attempt} failed (${kind})${then}`, error: failureText(failure)};
      }
      case "TimerStarted": return {text: `timer started, fires at ${fmtPrecise(d.fire_at_ms)}` +
        ` (after ${fmtDuration(d.fire_at_ms - event.at_ms)})`};
      case "TimerFired": return {text: "timer fired"};
      case "TimerCancelled": return {text: "timer cancelled"};
      case "PromiseCreated": return {text: `promise ${event.name || ""} created`};
      case "PromiseCompleted": return d.failure
        ? {text: "promise failed", error: failureText(d.failure)}
        : {text: "promise completed", blocks: [payloadBlock("value", d.payload, false)]};
      case "SignalReceived": return {text: `signal ${event.name} received`,
        blocks: [payloadBlock("payload", d.payload, true)]};
      case "CancelRequested": return {text: `cancel requested${d.reason ? `: ${d.reason}` : ""}`};
      case "UpdateAccepted": return {text: `update ${event.name} accepted`,
        blocks: [payloadBlock("arguments", d.args, false)]};
      case "PatchMarker": return {text: `patch ${event.name}${d.deprecated ? " (deprecated)" : ""}`};
      default: return {text: `${event.kind}${event.name ? ` ${event.name}` : ""}`,
        blocks: Object.keys(d).length ? [el("pre", {}, JSON.stringify(d, null, 2))] : []};
    }
  }

  function eventLine(event, startMs, extraClass) {
    const said = describeEvent(event);
    return el("li", {class: `event ${extraClass || ""}`, data: {kind: event.kind}},
      el("time", {title: fmtPrecise(event.at_ms)}, `+${fmtDuration(event.at_ms - startMs)}`),
      el("span", {class: "kind"}, event.kind),
      el("span", {class: "what"}, said.text),
      said.error ? el("div", {class: "event-error"}, said.error) : null,
      said.blocks || null);
  }

  function drawTimeline(answer) {
    const wf = answer.workflow;
    const list = byId("timeline");
    clear(list);
    const open = OPEN.has(wf.status);
    const start = wf.started_at_ms;
    byId("event-count").textContent = `${answer.events.length} events`;
    list.appendChild(el("li", {class: "mark", data: {kind: "started"}},
      el("time", {title: fmtPrecise(start)}, fmtPrecise(start)),
      el("span", {class: "kind"}, "started"),
      el("span", {class: "what"}, `${wf.workflow_type} run ${wf.run_id}`)));
    for (const item of timelineItems(answer.events)) {
      if (item.event) {
        const kind = item.event.kind;
        const cls = kind === "CancelRequested" ? "standalone cancel" : "standalone";
        list.appendChild(eventLine(item.event, start, cls));
        continue;
      }
      const step = item.step;
      const about = describeStep(step);
      const outcome = stepOutcome(step, open);
      const attempts = Math.max(0, ...step.events.map((e) => e.attempt || 0));
      const name = about.link
        ? el("a", {href: workflowHash(about.link, "")}, about.name)
        : el("span", {class: "step-name"}, about.name);
      list.appendChild(el("li", {
        class: `step step-${about.kind} outcome-${outcome}`,
        data: {seq: step.seq, step: about.kind, name: about.name, outcome},
      },
      el("div", {class: "step-head"},
        el("span", {class: `tag ${about.kind}`}, about.label),
        name,
        el("span", {class: `outcome ${outcome}`}, outcome),
        attempts > 1 ? el("span", {class: "note"}, `${attempts} attempts`) : null,
        el("span", {class: "note"}, `step ${step.seq}`)),
      el("ol", {class: "step-events"}, step.events.map((e) => eventLine(e, start, "")))));
    }
    if (wf.status === "STUCK") {
      list.appendChild(el("li", {class: "mark stuck", data: {kind: "stuck"}},
        el("time", {title: fmtPrecise(wf.updated_at_ms)}, `+${fmtDuration(wf.updated_at_ms - start)}`),
        el("span", {class: "kind"}, "stuck"),
        el("span", {class: "what"}, failureText({error_type: wf.error_type || "",
          message: wf.error_message || ""}))));
    } else if (!open) {
      const at = wf.closed_at_ms || wf.updated_at_ms;
      list.appendChild(el("li", {class: `mark closed status-${wf.status.toLowerCase()}`,
        data: {kind: "closed"}},
      el("time", {title: fmtPrecise(at)}, `+${fmtDuration(at - start)}`),
      el("span", {class: "kind"}, "closed"),
      el("span", {class: "what"}, wf.status,
        wf.error_type ? ` — ${failureText({error_type: wf.error_type,
          message: wf.error_message || ""})}` : "")));
    }
  }

  // --- start -------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    setUpList();
    setUpActions();
    window.addEventListener("hashchange", render);
    render();
  });
})();
