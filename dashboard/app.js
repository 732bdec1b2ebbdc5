/*
 * tether fleet dashboard. Plain browser JavaScript, no build step.
 *
 * Data flow: the WebSocket /ws sends INIT (the first page of the filtered, sorted
 * device list, with the count of all that match), PAGE (the next page, after a
 * MORE), UPDT (devices shown that changed) and MSG (lines of the selected
 * device). The table is rebuilt only on INIT; PAGE rows are added; UPDT changes
 * are collected per device id and written into the existing rows once per
 * animation frame, touching only the cells whose text changed. Filtering and
 * sorting are done by the server (FILT). Pages are loaded by themselves up to
 * AUTO_ROWS rows; beyond, when the end of the table comes into view or on
 * "Show more", so a fleet of 100,000 never arrives in one message.
 */
'use strict';
(function () {
  const $ = (id) => document.getElementById(id);
  const RATE_MIN_MS = 2000; // message rate = counter delta over at least this long…
  const RATE_WINDOW_MS = 10000; // …and at most this long (a sliding window of once-a-second snapshots)
  const MAX_LINES = 200; // recent lines kept in the device view
  const MAX_POINTS = 2000; // chart points kept
  const TOKEN_KEY = 'tether.token';
  const CHART_HEIGHT = 200;
  const AUTO_ROWS = 2000; // pages loaded without asking; beyond, the end of the table or "Show more" loads the next

  const el = {
    wsState: $('ws-state'),
    error: $('error'),
    token: $('token'),
    tokenClear: $('token-clear'),
    type: $('filter-type'),
    status: $('filter-status'),
    q: $('filter-q'),
    count: $('count'),
    rows: $('rows'),
    empty: $('empty'),
    table: document.querySelector('table.devices'),
    more: $('more'),
    moreButton: $('more-button'),
    moreNote: $('more-note'),
    device: $('device'),
    dvTitle: $('device-title'),
    dvId: $('dv-id'),
    dvStatus: $('dv-status'),
    dvClose: $('dv-close'),
    dvMeta: $('dv-meta'),
    dvCounters: $('dv-counters'),
    dvLines: $('dv-lines'),
    tmName: $('tm-name'),
    chart: $('chart'),
    chartNote: $('chart-note'),
    sendForm: $('send-form'),
    sendLine: $('send-line'),
    sendTimeout: $('send-timeout'),
    sendAccepted: $('send-accepted'),
    sendButton: $('send-button'),
    sendResult: $('send-result'),
  };

  /** id -> { info, sum, hist: [{sum, at}], rate } for every device seen. */
  const known = new Map();
  /** id -> row record for the rows currently in the table. */
  const rows = new Map();
  /** ids in table order. */
  let order = [];
  const types = new Set();
  const filter = { type: '', status: '', q: '', sort: 'id', dir: 'asc' };
  let userFiltered = false;
  /** Devices matching the filter on the server, whether all of them are in the table, and whether a page is on its way. */
  let total = 0;
  let complete = true;
  let loadingMore = false;

  // ---------------------------------------------------------------- formatting

  function ago(ms) {
    if (ms == null) return 'never';
    const s = Math.floor((Date.now() - ms) / 1000);
    if (s < 2) return 'just now';
    if (s < 60) return s + ' s ago';
    if (s < 3600) return Math.floor(s / 60) + ' min ago';
    if (s < 86400) return Math.floor(s / 3600) + ' h ago';
    return Math.floor(s / 86400) + ' d ago';
  }

  /**
   * A device whose link is up has been heard within the protocol timeout (keepalives),
   * but the server does not push keepalive-only changes, so its lastSeen may be old news:
   * "now" is the truth for it. For a device that is down, lastSeen is exact.
   */
  function seenText(d) {
    return d.status === 'up' ? 'now' : ago(d.lastSeen);
  }

  function clock(ms) {
    const d = new Date(ms);
    const p = (n, w) => String(n).padStart(w || 2, '0');
    return p(d.getHours()) + ':' + p(d.getMinutes()) + ':' + p(d.getSeconds()) + '.' + p(d.getMilliseconds(), 3);
  }

  function fmtValue(v) {
    if (typeof v === 'number') return Number.isInteger(v) ? String(v) : String(Math.round(v * 100) / 100);
    if (typeof v === 'string') return v.length > 24 ? v.slice(0, 23) + '…' : v;
    return String(v);
  }

  function fmtTelemetry(tm) {
    if (!tm) return '';
    const parts = [];
    for (const name of Object.keys(tm).sort()) {
      const s = tm[name];
      if (s) parts.push(name + ' ' + fmtValue(s.value));
    }
    return parts.join(' · ');
  }

  function fmtRate(r) {
    if (r == null) return '–';
    if (r === 0) return '0';
    return r < 10 ? r.toFixed(2) : r.toFixed(1);
  }

  function msgSum(info) {
    const c = info.counters || {};
    return (c.messagesIn || 0) + (c.messagesOut || 0);
  }

  // ---------------------------------------------------------------- device state

  /** Stores a fresh DeviceInfo; the rate itself is computed by the ticker. */
  function remember(info) {
    const now = Date.now();
    let k = known.get(info.id);
    const sum = msgSum(info);
    if (!k) {
      k = { info, sum, hist: [{ sum, at: now }], rate: null };
      known.set(info.id, k);
    } else {
      if (sum < k.sum) { k.hist = [{ sum, at: now }]; k.rate = null; } // counters restarted
      k.info = info;
      k.sum = sum;
    }
    if (info.type != null && !types.has(info.type)) {
      types.add(info.type);
      typesDirty = true;
    }
    return k;
  }

  /**
   * Messages per second over the last RATE_WINDOW_MS, from the once-a-second snapshots of
   * the counters. The server reports a device when a message arrives from it or its link
   * changes, so between reports its counters are taken as unchanged (messages sent to it
   * count from its next report on).
   */
  function updateRate(k, now) {
    const h = k.hist;
    h.push({ sum: k.sum, at: now });
    while (h.length > 2 && now - h[1].at >= RATE_WINDOW_MS) h.shift();
    const span = now - h[0].at;
    if (span >= RATE_MIN_MS) k.rate = ((k.sum - h[0].sum) * 1000) / span;
  }

  let typesDirty = false;
  function refreshTypeOptions() {
    if (!typesDirty) return;
    typesDirty = false;
    const have = new Set([...el.type.options].map((o) => o.value));
    const sorted = [...types].sort();
    for (const t of sorted) {
      if (have.has(t)) continue;
      const o = document.createElement('option');
      o.value = t;
      o.textContent = t;
      // keep the options sorted after "all types"
      let before = null;
      for (const x of el.type.options) if (x.value && x.value > t) { before = x; break; }
      el.type.insertBefore(o, before);
    }
  }

  // ---------------------------------------------------------------- rows

  function td(row, cls) {
    const c = document.createElement('td');
    if (cls) c.className = cls;
    row.appendChild(c);
    return c;
  }

  function makeRow(id) {
    const tr = document.createElement('tr');
    tr.dataset.id = id;
    tr.dataset.testid = 'row-' + id;
    tr.tabIndex = 0;
    const idCell = document.createElement('th');
    idCell.scope = 'row';
    tr.appendChild(idCell);
    const type = td(tr, 'type');
    const statusCell = td(tr);
    const badge = document.createElement('span');
    badge.className = 'badge';
    badge.dataset.testid = 'status-' + id;
    statusCell.appendChild(badge);
    // What needs the operator: nobody reading the device, its app failing.
    const note = document.createElement('span');
    note.className = 'note';
    note.dataset.testid = 'note-' + id;
    statusCell.appendChild(note);
    const rec = {
      tr,
      id: idCell,
      type,
      badge,
      note,
      remote: td(tr, 'remote'),
      seen: td(tr, 'seen'),
      outages: td(tr, 'num'),
      msgs: td(tr, 'num'),
      rate: td(tr, 'num'),
      tm: td(tr, 'tm'),
      v: {}, // texts last written, to skip unchanged cells
    };
    rec.seen.dataset.testid = 'seen-' + id;
    rec.outages.dataset.testid = 'outages-' + id;
    rec.msgs.dataset.testid = 'messages-' + id;
    rec.rate.dataset.testid = 'rate-' + id;
    rec.tm.dataset.testid = 'telemetry-' + id;
    return rec;
  }

  function set(rec, key, cell, text) {
    if (rec.v[key] === text) return;
    rec.v[key] = text;
    cell.textContent = text;
  }

  function paintRow(rec, k) {
    const d = k.info;
    set(rec, 'id', rec.id, d.id);
    set(rec, 'type', rec.type, d.type == null ? '—' : d.type);
    if (rec.v.status !== d.status) {
      rec.v.status = d.status;
      rec.badge.textContent = d.status;
      rec.badge.dataset.status = d.status;
      rec.tr.dataset.status = d.status;
    }
    set(rec, 'note', rec.note, noteText(d));
    set(rec, 'remote', rec.remote, d.remote || '—');
    set(rec, 'seen', rec.seen, seenText(d));
    if (rec.v.seenAt !== d.lastSeen) {
      rec.v.seenAt = d.lastSeen;
      rec.seen.title = d.lastSeen ? new Date(d.lastSeen).toLocaleString() : '';
    }
    set(rec, 'outages', rec.outages, String((d.counters && d.counters.outages) || 0));
    set(rec, 'msgs', rec.msgs, String(msgSum(d)));
    set(rec, 'rate', rec.rate, fmtRate(k.rate));
    set(rec, 'tm', rec.tm, fmtTelemetry(d.telemetry));
  }

  /** Rows taken out of the table, kept to be put back (a few; cleared on INIT). */
  const spare = new Map();

  function rowFor(id) {
    let rec = rows.get(id);
    if (!rec) {
      rec = spare.get(id) || makeRow(id);
      spare.delete(id);
      rows.set(id, rec);
    }
    return rec;
  }

  let resetRates = false;

  function renderAll(devices) {
    const frag = document.createDocumentFragment();
    const keep = new Set();
    order = [];
    const now = Date.now();
    for (const d of devices) {
      // A device we heard nothing about for a while (filtered out, or the socket was down)
      // starts a fresh rate window instead of showing its missed messages as a burst.
      const fresh = resetRates || !rows.has(d.id);
      const k = remember(d);
      if (fresh) {
        k.hist = [{ sum: k.sum, at: now }];
        k.rate = null;
      }
      const rec = rowFor(d.id);
      paintRow(rec, k);
      rec.tr.classList.toggle('selected', d.id === selected);
      rec.tr.setAttribute('aria-selected', d.id === selected ? 'true' : 'false');
      frag.appendChild(rec.tr);
      keep.add(d.id);
      order.push(d.id);
    }
    for (const id of rows.keys()) if (!keep.has(id)) rows.delete(id);
    spare.clear();
    resetRates = false;
    el.rows.replaceChildren(frag);
    afterRowsChanged();
  }

  function afterRowsChanged() {
    el.count.textContent = complete ? String(order.length) : order.length + ' of ' + Math.max(total, order.length);
    el.empty.hidden = order.length > 0;
    el.more.hidden = complete;
    if (!complete) {
      el.moreButton.disabled = loadingMore;
      el.moreNote.textContent = loadingMore ? 'loading…' : order.length + ' of ' + Math.max(total, order.length) + ' devices shown';
    }
    refreshTypeOptions();
  }

  // ---------------------------------------------------------------- pages

  function requestMore() {
    if (complete || loadingMore || !ws || ws.readyState !== WebSocket.OPEN) return;
    loadingMore = true;
    send({ t: 'MORE' });
    afterRowsChanged();
  }

  /** The next page loads by itself while the table is short, or once its end is in view. */
  function maybeLoadMore() {
    if (complete || loadingMore) return;
    if (order.length < AUTO_ROWS || moreInView) requestMore();
  }

  let moreInView = false;
  if (typeof IntersectionObserver === 'function') {
    new IntersectionObserver((entries) => {
      moreInView = entries.some((e) => e.isIntersecting);
      if (moreInView) maybeLoadMore();
    }).observe(el.more);
  }
  el.moreButton.addEventListener('click', requestMore);

  /** Rows of a PAGE: after the ones shown, in the server's order (placed by the sort if one moved meanwhile). */
  function addPage(devices) {
    for (const d of devices) {
      const k = remember(d);
      if (rows.has(d.id)) {
        paintRow(rows.get(d.id), k);
        continue;
      }
      k.hist = [{ sum: k.sum, at: Date.now() }];
      k.rate = null;
      const last = order.length ? known.get(order[order.length - 1]) : null;
      if (!last || compare(d, last.info) >= 0) {
        const rec = rowFor(d.id);
        paintRow(rec, k);
        el.rows.appendChild(rec.tr);
        order.push(d.id);
      } else {
        insertRow(k);
      }
    }
  }

  // The server's order (see compareDevices in src/http.ts), used to place rows that
  // arrive in an UPDT; INIT lists come sorted already.
  const collator = new Intl.Collator('en', { numeric: true });
  const STATUS_RANK = { up: 0, down: 1, closed: 2 };
  function sortValue(d) {
    const c = d.counters || {};
    switch (filter.sort) {
      case 'type': return d.type == null ? null : d.type;
      case 'status': return STATUS_RANK[d.status] == null ? 3 : STATUS_RANK[d.status];
      case 'lastSeen': return d.lastSeen == null ? null : d.lastSeen;
      case 'outages': return c.outages || 0;
      case 'messages': return (c.messagesIn || 0) + (c.messagesOut || 0);
      default: return d.id;
    }
  }
  function compare(a, b) {
    const x = sortValue(a), y = sortValue(b);
    if (x !== y) {
      if (x === null) return 1; // missing values last, whatever the direction
      if (y === null) return -1;
      const c = typeof x === 'string' && typeof y === 'string' ? collator.compare(x, y) : x - y;
      if (c !== 0) return filter.dir === 'desc' ? -c : c;
    }
    return collator.compare(a.id, b.id);
  }
  /** Sort fields whose changes move a row at once; rows sorted by lastSeen or messages stay put until the next INIT. */
  const MOVES = new Set(['id', 'type', 'status', 'outages']);

  function insertRow(k) {
    const rec = rowFor(k.info.id);
    paintRow(rec, k);
    // place it where the sort puts it (linear scan; new devices are rare)
    let at = order.length;
    for (let i = 0; i < order.length; i++) {
      const other = known.get(order[i]);
      if (other && compare(k.info, other.info) < 0) { at = i; break; }
    }
    const before = at < order.length ? rows.get(order[at]).tr : null;
    el.rows.insertBefore(rec.tr, before);
    order.splice(at, 0, k.info.id);
  }

  function removeRow(id) {
    const rec = rows.get(id);
    if (!rec) return;
    rec.tr.remove();
    rows.delete(id);
    spare.set(id, rec);
    const i = order.indexOf(id);
    if (i >= 0) order.splice(i, 1);
  }

  // ---------------------------------------------------------------- batched updates

  const pending = new Map();
  const pendingRemoved = new Set();
  let frameQueued = false;

  function queueUpdates(devices, removed) {
    for (const id of removed) {
      pending.delete(id);
      pendingRemoved.add(id);
    }
    for (const d of devices) {
      pendingRemoved.delete(d.id);
      pending.set(d.id, d);
    }
    if (!frameQueued) {
      frameQueued = true;
      requestAnimationFrame(flush);
    }
  }

  function flush() {
    frameQueued = false;
    let changedSet = false;
    for (const id of pendingRemoved) {
      pending.delete(id);
      if (rows.has(id)) { removeRow(id); changedSet = true; }
    }
    pendingRemoved.clear();
    // The server sends only devices that match the filter.
    for (const d of pending.values()) {
      const prev = known.get(d.id);
      const oldKey = prev && rows.has(d.id) ? sortValue(prev.info) : undefined;
      const k = remember(d);
      if (!rows.has(d.id)) {
        insertRow(k);
        changedSet = true;
      } else if (MOVES.has(filter.sort) && sortValue(d) !== oldKey) {
        removeRow(d.id);
        insertRow(k);
      } else {
        paintRow(rows.get(d.id), k);
      }
      if (d.id === selected) paintDevice(k, true);
    }
    pending.clear();
    if (changedSet || typesDirty) afterRowsChanged();
    if (changedSet) maybeLoadMore();
  }

  /** Once a second: relative times and message rates. */
  function tick() {
    const now = Date.now();
    for (const k of known.values()) updateRate(k, now);
    for (const [id, rec] of rows) {
      const k = known.get(id);
      if (!k) continue;
      set(rec, 'seen', rec.seen, seenText(k.info));
      set(rec, 'rate', rec.rate, fmtRate(k.rate));
    }
    if (selected) {
      const k = known.get(selected);
      if (k) setDl(el.dvMeta, metaPairs(k.info));
    }
  }
  setInterval(tick, 1000);

  // ---------------------------------------------------------------- filters and sorting

  function sendFilter() {
    userFiltered = true;
    // every key is sent: the server keeps the keys a FILT leaves out
    send({ t: 'FILT', type: filter.type || null, status: filter.status || null, q: filter.q, sort: filter.sort, dir: filter.dir });
  }

  el.type.addEventListener('change', () => { filter.type = el.type.value; sendFilter(); });
  el.status.addEventListener('change', () => { filter.status = el.status.value; sendFilter(); });
  let qTimer = null;
  el.q.addEventListener('input', () => {
    clearTimeout(qTimer);
    qTimer = setTimeout(() => { filter.q = el.q.value.trim(); sendFilter(); }, 200);
  });
  $('filters').addEventListener('submit', (e) => e.preventDefault());

  function showSort() {
    for (const th of el.table.querySelectorAll('th[data-sort]')) {
      const on = th.dataset.sort === filter.sort;
      th.setAttribute('aria-sort', on ? (filter.dir === 'desc' ? 'descending' : 'ascending') : 'none');
    }
  }
  for (const th of el.table.querySelectorAll('th[data-sort]')) {
    th.querySelector('button').addEventListener('click', () => {
      const key = th.dataset.sort;
      if (filter.sort === key) filter.dir = filter.dir === 'asc' ? 'desc' : 'asc';
      else { filter.sort = key; filter.dir = 'asc'; }
      showSort();
      sendFilter();
    });
  }
  showSort();

  /** Before the user touches anything, the controls show what the server applied. */
  function adoptFilter(f) {
    if (!f || userFiltered) return;
    if (typeof f.sort === 'string') filter.sort = f.sort;
    if (f.dir === 'asc' || f.dir === 'desc') filter.dir = f.dir;
    showSort();
  }

  // ---------------------------------------------------------------- WebSocket

  let ws = null;
  let backoff = 500;
  let attempt = 0;
  let retryAt = 0;
  let retryTimer = null;
  let countdown = null;

  function setWsState(state, text) {
    el.wsState.dataset.state = state;
    el.wsState.textContent = text;
    document.body.dataset.ws = state;
  }

  function send(msg) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(msg));
  }

  function connect() {
    clearTimeout(retryTimer);
    clearInterval(countdown);
    attempt++;
    setWsState('connecting', attempt > 1 ? 'reconnecting… (attempt ' + attempt + ')' : 'connecting…');
    const url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws';
    let sock;
    try {
      sock = new WebSocket(url);
    } catch (e) {
      scheduleReconnect();
      return;
    }
    ws = sock;
    sock.onopen = () => {
      backoff = 500;
      attempt = 0;
      setWsState('live', 'live');
      resetRates = true;
      if (userFiltered) sendFilter();
      // lines may have been missed while the socket was down: load the device view afresh
      if (selected) select(selected, { reload: true });
    };
    sock.onmessage = (e) => {
      let msg;
      try { msg = JSON.parse(e.data); } catch { return; }
      handle(msg);
    };
    sock.onclose = () => {
      if (ws !== sock) return;
      ws = null;
      loadingMore = false; // a page asked for on this socket will not come; the next INIT starts afresh
      scheduleReconnect();
    };
    sock.onerror = () => {}; // onclose follows
  }

  function scheduleReconnect() {
    const wait = Math.round(backoff * (0.8 + Math.random() * 0.4));
    backoff = Math.min(backoff * 2, 15000);
    retryAt = Date.now() + wait;
    const show = () => {
      const s = Math.max(0, Math.ceil((retryAt - Date.now()) / 1000));
      setWsState('down', 'disconnected, retrying in ' + s + ' s');
    };
    show();
    countdown = setInterval(show, 500);
    retryTimer = setTimeout(connect, wait);
  }

  function handle(msg) {
    switch (msg.t) {
      case 'INIT':
        adoptFilter(msg.filter);
        pending.clear();
        pendingRemoved.clear();
        total = typeof msg.total === 'number' ? msg.total : (msg.devices || []).length;
        complete = msg.complete !== false;
        loadingMore = false;
        renderAll(msg.devices || []);
        maybeLoadMore();
        if (selected) {
          const k = known.get(selected);
          if (k) paintDevice(k, true);
        }
        break;
      case 'PAGE':
        total = typeof msg.total === 'number' ? msg.total : total;
        complete = msg.complete !== false;
        loadingMore = false;
        addPage(msg.devices || []);
        afterRowsChanged();
        maybeLoadMore();
        break;
      case 'UPDT':
        if (typeof msg.total === 'number') {
          total = msg.total;
          if (!complete) afterRowsChanged();
        }
        queueUpdates(msg.devices || [], msg.removed || []);
        break;
      case 'MSG':
        onLiveLine(msg);
        break;
      case 'ERR':
        showError(msg.error || 'server error');
        break;
    }
  }

  let errorTimer = null;
  function showError(text) {
    el.error.textContent = text;
    el.error.hidden = false;
    clearTimeout(errorTimer);
    errorTimer = setTimeout(() => { el.error.hidden = true; }, 10000);
  }

  // ---------------------------------------------------------------- token

  function token() {
    try { return sessionStorage.getItem(TOKEN_KEY) || ''; } catch { return ''; }
  }
  el.token.value = token();
  el.token.addEventListener('input', () => {
    try {
      if (el.token.value) sessionStorage.setItem(TOKEN_KEY, el.token.value);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch { /* storage disabled: the token lives in the field only */ }
    el.token.removeAttribute('aria-invalid');
  });
  el.tokenClear.addEventListener('click', () => {
    el.token.value = '';
    el.token.dispatchEvent(new Event('input'));
  });
  $('token-form').addEventListener('submit', (e) => e.preventDefault());

  function authHeaders(extra) {
    const h = Object.assign({}, extra);
    const t = el.token.value || token();
    if (t) h.authorization = 'Bearer ' + t;
    return h;
  }

  async function api(path, init) {
    const res = await fetch(path, Object.assign({}, init, { headers: authHeaders((init && init.headers) || {}) }));
    let body = null;
    try { body = await res.json(); } catch { body = null; }
    return { status: res.status, ok: res.ok, body };
  }

  // ---------------------------------------------------------------- device view

  let selected = null;
  let loadSeq = 0;
  let linesReady = false;
  let earlyLines = [];
  let lastLineT = -Infinity;

  function devicePath(id) {
    return '/api/devices/' + encodeURIComponent(id);
  }

  el.rows.addEventListener('click', (e) => {
    const tr = e.target.closest('tr[data-id]');
    if (tr) select(tr.dataset.id);
  });
  el.rows.addEventListener('keydown', (e) => {
    if (e.key !== 'Enter' && e.key !== ' ') return;
    const tr = e.target.closest('tr[data-id]');
    if (!tr) return;
    e.preventDefault();
    select(tr.dataset.id);
  });
  el.dvClose.addEventListener('click', () => {
    const was = selected;
    select(null);
    const rec = was && rows.get(was);
    if (rec) rec.tr.focus();
  });
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Escape' && selected && el.device.contains(document.activeElement)) el.dvClose.click();
  });

  function markSelected(id, on) {
    const rec = id && rows.get(id);
    if (!rec) return;
    rec.tr.classList.toggle('selected', on);
    rec.tr.setAttribute('aria-selected', on ? 'true' : 'false');
  }

  async function select(id, opts) {
    const reload = !!(opts && opts.reload);
    if (selected === id && id !== null && !reload) return;
    markSelected(selected, false);
    selected = id;
    markSelected(id, true);
    send({ t: 'SEL', id });
    const seq = ++loadSeq;
    if (id === null) {
      el.device.hidden = true;
      document.body.classList.remove('with-device');
      destroyChart();
      return;
    }
    el.device.hidden = false;
    document.body.classList.add('with-device');
    el.dvId.textContent = id;
    el.dvLines.replaceChildren();
    if (!reload) {
      el.sendResult.textContent = '';
      el.sendResult.dataset.outcome = '';
    }
    el.chartNote.textContent = 'loading…';
    linesReady = false;
    earlyLines = [];
    lastLineT = -Infinity;
    const k = known.get(id);
    if (k) paintDevice(k, false);
    if (!reload) el.dvTitle.focus({ preventScroll: true });

    let res;
    try {
      res = await api(devicePath(id));
    } catch (e) {
      if (seq === loadSeq) el.chartNote.textContent = 'cannot reach the server: ' + e.message;
      return;
    }
    if (seq !== loadSeq) return; // another device was chosen meanwhile
    if (!res.ok || !res.body || !res.body.device) {
      el.chartNote.textContent = 'cannot load the device: ' + ((res.body && res.body.error) || 'HTTP ' + res.status);
      if (res.status === 401) tokenNeeded();
      return;
    }
    const body = res.body;
    const dk = remember(body.device);
    paintDevice(dk, false);
    const recent = body.recent || [];
    for (const r of recent) addLine(r.dir, r.line, r.t);
    if (recent.length) lastLineT = recent[recent.length - 1].t;
    // lines that arrived over the socket while the GET was under way
    const seenInGet = new Set(recent.map((r) => r.t + '|' + r.dir + '|' + r.line));
    for (const m of earlyLines) {
      if (m.time < lastLineT || seenInGet.has(m.time + '|' + m.dir + '|' + m.line)) continue;
      addLine(m.dir, m.line, m.time);
    }
    earlyLines = [];
    linesReady = true;
    setupChart(body.telemetry || {}, dk.info);
  }

  function onLiveLine(m) {
    if (!selected || m.id !== selected) return;
    if (!linesReady) {
      if (earlyLines.length < MAX_LINES) earlyLines.push(m);
      return;
    }
    addLine(m.dir, m.line, m.time);
  }

  function addLine(dir, line, t) {
    const li = document.createElement('li');
    li.className = dir === 'out' ? 'out' : 'in';
    const time = document.createElement('time');
    time.dateTime = new Date(t).toISOString();
    time.textContent = clock(t);
    const arrow = document.createElement('span');
    arrow.className = 'dir';
    arrow.textContent = dir === 'out' ? 'to device' : 'from device';
    const code = document.createElement('code');
    code.textContent = String(line).replace(/\n$/, '');
    li.append(time, arrow, code);
    el.dvLines.prepend(li); // newest first
    while (el.dvLines.childElementCount > MAX_LINES) el.dvLines.lastElementChild.remove();
  }

  /** A short warning for the device's row: stalled, or its app failing; '' when all is well. */
  function noteText(d) {
    if (d.stalled) return 'stalled: nobody is reading';
    const apps = d.apps || [];
    const failing = apps.find((a) => a.state === 'restarting');
    if (failing) return 'app ' + failing.app + ' failed, restarting';
    const failures = apps.reduce((n, a) => n + (a.failures || 0), 0);
    return failures > 0 ? 'app failures: ' + failures : '';
  }

  function metaPairs(d) {
    const pairs = [
      ['type', d.type == null ? '—' : d.type],
      ['remote', d.remote || '—'],
      ['receive buffer', (d.buffered || 0) + ' lines waiting, ' + (d.held || 0) + ' held un-ACKed' + (d.stalled ? ' — stalled: nobody is reading' : '')],
      ...(d.apps || []).map((a) => [
        'app ' + a.app,
        a.state + (a.failures ? ', ' + a.failures + ' failure' + (a.failures === 1 ? '' : 's') + (a.lastError ? ', last: ' + a.lastError : '') : ''),
      ]),
      ['last seen', d.status === 'up' ? 'now (link up)' : d.lastSeen ? ago(d.lastSeen) + ' (' + new Date(d.lastSeen).toLocaleTimeString() + ')' : 'never'],
    ];
    const meta = d.meta || {};
    for (const key of Object.keys(meta)) {
      const v = meta[key];
      pairs.push([key, typeof v === 'string' ? v : JSON.stringify(v)]);
    }
    return pairs;
  }

  /** Fills a <dl> with [term, value] pairs (each a <div><dt><dd></div>), reusing its elements. */
  function setDl(dl, pairs) {
    const kids = dl.children;
    for (let i = 0; i < pairs.length; i++) {
      let group = kids[i];
      if (!group) {
        group = document.createElement('div');
        group.append(document.createElement('dt'), document.createElement('dd'));
        dl.append(group);
      }
      const dt = group.firstChild, dd = group.lastChild;
      if (dt.textContent !== pairs[i][0]) dt.textContent = pairs[i][0];
      const v = String(pairs[i][1]);
      if (dd.textContent !== v) dd.textContent = v;
    }
    while (dl.children.length > pairs.length) dl.lastElementChild.remove();
  }

  function paintDevice(k, live) {
    const d = k.info;
    el.dvStatus.textContent = d.status;
    el.dvStatus.dataset.status = d.status;
    setDl(el.dvMeta, metaPairs(d));
    const c = d.counters || {};
    setDl(el.dvCounters, Object.keys(c).map((key) => [key, c[key]]));
    if (live) liveTelemetry(d);
  }

  // ---------------------------------------------------------------- telemetry chart

  let chart = null;
  let series = { name: null, xs: [], ys: [], lastT: -Infinity };
  let resizeObs = null;

  function numeric(v) {
    if (typeof v === 'number') return Number.isFinite(v) ? v : null;
    if (typeof v === 'boolean') return v ? 1 : 0;
    if (typeof v === 'string' && v.trim() !== '') {
      const n = Number(v);
      return Number.isFinite(n) ? n : null;
    }
    return null;
  }

  function destroyChart() {
    if (chart) chart.destroy();
    chart = null;
    if (resizeObs) resizeObs.disconnect();
    resizeObs = null;
    series = { name: null, xs: [], ys: [], lastT: -Infinity };
    el.chart.replaceChildren();
    el.chart.dataset.points = '0';
  }

  function setupChart(history, info) {
    const names = new Set(Object.keys(history));
    for (const n of Object.keys(info.telemetry || {})) names.add(n);
    const list = [...names].sort();
    const keep = el.tmName.value;
    el.tmName.replaceChildren(...list.map((n) => {
      const o = document.createElement('option');
      o.value = n;
      o.textContent = n;
      return o;
    }));
    if (list.length === 0) {
      destroyChart();
      el.tmName.disabled = true;
      el.chartNote.textContent = 'This device has no telemetry yet.';
      return;
    }
    el.tmName.disabled = false;
    // prefer the series chosen before, then the first one with numbers
    let name = list.includes(keep) ? keep : null;
    if (!name) name = list.find((n) => (history[n] || []).some((s) => numeric(s.value) !== null)) || list[0];
    el.tmName.value = name;
    drawSeries(name, history[name] || []);
  }

  function drawSeries(name, samples) {
    destroyChart();
    series.name = name;
    for (const s of samples) {
      const y = numeric(s.value);
      if (y === null) continue;
      series.xs.push(s.t / 1000);
      series.ys.push(y);
      series.lastT = s.t;
    }
    if (typeof window.uPlot !== 'function') {
      el.chartNote.textContent = 'The chart library did not load (/vendor/uplot/uPlot.iife.min.js).';
      return;
    }
    const width = Math.max(260, el.chart.clientWidth || 600);
    const opts = {
      width,
      height: CHART_HEIGHT,
      title: name,
      scales: { x: { time: true } },
      legend: { show: true },
      series: [
        { label: 'time' },
        { label: name, stroke: '#2563eb', width: 2, fill: 'rgba(37, 99, 235, 0.08)', points: { show: true, size: 4 } },
      ],
      axes: [
        { stroke: '#5b6472', grid: { stroke: '#e6e8ec' } },
        { stroke: '#5b6472', grid: { stroke: '#e6e8ec' }, size: 56 },
      ],
    };
    chart = new window.uPlot(opts, [series.xs, series.ys], el.chart);
    el.chart.dataset.points = String(series.xs.length);
    el.chart.dataset.series = name;
    el.chartNote.textContent = series.xs.length ? '' : 'No numeric samples of ' + name + ' yet.';
    if (typeof ResizeObserver === 'function') {
      resizeObs = new ResizeObserver(() => {
        const w = Math.max(260, el.chart.clientWidth);
        if (chart && Math.abs(chart.width - w) > 2) chart.setSize({ width: w, height: CHART_HEIGHT });
      });
      resizeObs.observe(el.chart);
    }
  }

  el.tmName.addEventListener('change', async () => {
    const id = selected;
    const name = el.tmName.value;
    if (!id || !name) return;
    el.chartNote.textContent = 'loading…';
    try {
      const res = await api(devicePath(id) + '/telemetry/' + encodeURIComponent(name));
      if (selected !== id || el.tmName.value !== name) return;
      if (!res.ok) {
        el.chartNote.textContent = 'cannot load ' + name + ': ' + ((res.body && res.body.error) || 'HTTP ' + res.status);
        return;
      }
      drawSeries(name, (res.body && res.body.samples) || []);
    } catch (e) {
      el.chartNote.textContent = 'cannot reach the server: ' + e.message;
    }
  });

  /** A new latest sample in an UPDT becomes a new point. */
  function liveTelemetry(d) {
    const tm = d.telemetry || {};
    const have = new Set([...el.tmName.options].map((o) => o.value));
    let added = false;
    for (const n of Object.keys(tm)) {
      if (have.has(n)) continue;
      const o = document.createElement('option');
      o.value = n;
      o.textContent = n;
      el.tmName.appendChild(o);
      added = true;
    }
    if (added && !series.name && linesReady) {
      el.tmName.disabled = false;
      drawSeries(el.tmName.value, []);
    }
    const s = series.name && tm[series.name];
    if (!s || s.t <= series.lastT) return;
    const y = numeric(s.value);
    series.lastT = s.t;
    if (y === null) return;
    series.xs.push(s.t / 1000);
    series.ys.push(y);
    if (series.xs.length > MAX_POINTS) {
      series.xs.splice(0, series.xs.length - MAX_POINTS);
      series.ys.splice(0, series.ys.length - MAX_POINTS);
    }
    if (chart) {
      chart.setData([series.xs, series.ys]);
      el.chart.dataset.points = String(series.xs.length);
      el.chartNote.textContent = '';
    }
  }

  // ---------------------------------------------------------------- sending

  function tokenNeeded() {
    el.token.setAttribute('aria-invalid', 'true');
  }

  function showOutcome(outcome, text) {
    el.sendResult.dataset.outcome = outcome;
    el.sendResult.textContent = text;
  }

  el.sendForm.addEventListener('submit', async (e) => {
    e.preventDefault();
    const id = selected;
    const line = el.sendLine.value;
    if (!id || !line) return;
    const body = { line };
    const timeout = Number(el.sendTimeout.value);
    if (el.sendTimeout.value !== '' && Number.isFinite(timeout) && timeout > 0) body.timeout = timeout;
    if (el.sendAccepted.checked) body.accepted = true;
    el.sendButton.disabled = true;
    showOutcome('pending', 'sending…');
    try {
      const res = await api(devicePath(id) + '/messages', {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify(body),
      });
      const b = res.body || {};
      if (res.status === 401) {
        tokenNeeded();
        showOutcome('unauthorized', '401 unauthorized: this server needs an API token; paste it in the "API token" field at the top.');
      } else if (res.ok && (b.status === 'delivered' || b.status === 'accepted')) {
        showOutcome(b.status, b.status === 'delivered'
          ? 'delivered: the device acknowledged the line'
          : 'accepted: queued, it is delivered in the background');
        el.sendLine.value = '';
      } else if (b.status === 'failed') {
        showOutcome('failed', 'failed: ' + (b.error || 'HTTP ' + res.status));
      } else {
        showOutcome('error', 'error ' + res.status + ': ' + (b.error || 'unexpected answer'));
      }
    } catch (err) {
      showOutcome('error', 'error: cannot reach the server (' + err.message + ')');
    } finally {
      el.sendButton.disabled = false;
    }
  });

  // ---------------------------------------------------------------- start

  connect();
})();
