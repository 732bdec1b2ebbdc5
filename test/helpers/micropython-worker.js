'use strict';
/**
 * Worker side of test/helpers/micropython.ts: one MicroPython (WebAssembly)
 * interpreter per worker thread, plus the JS objects the test stubs in
 * test/micropython/stubs/ talk to (sockets over node:net, WiFi, pins, WDT, timers).
 *
 * Why a worker: the MicroPython wasm glue keeps its runtime in realm globals
 * (globalThis.Module, globalThis.proxy_js_ref, ...), so a second interpreter
 * loaded in the same thread breaks the first one. A worker per interpreter gives
 * each its own realm, and terminate() ends its sockets and timers for sure.
 *
 * Plain JavaScript on purpose: a worker does not inherit ts-node, and loading it
 * per interpreter would cost about half a second each time.
 */
const { parentPort, workerData } = require('node:worker_threads');
const net = require('node:net');

const E = {
  EBADF: 9,
  EAGAIN: 11,
  EINVAL: 22,
  ECONNRESET: 104,
  EISCONN: 106,
  ENOTCONN: 107,
  ETIMEDOUT: 110,
  ECONNREFUSED: 111,
  EHOSTUNREACH: 113,
  EALREADY: 114,
  EINPROGRESS: 115,
};
const POLLIN = 1;
const POLLOUT = 4;
const POLLERR = 8;
const POLLHUP = 16;
const POLLNVAL = 32;

/** Node's writable buffer above this counts as a full send buffer (a board's is small). */
const SEND_BUFFER = 64 * 1024;

const post = (msg) => parentPort.postMessage(msg);
const timers = new Set(); // every timer this worker set for the stubs

function later(ms, fn) {
  const t = setTimeout(() => {
    timers.delete(t);
    fn();
  }, ms);
  timers.add(t);
  return t;
}

function cancel(t) {
  if (t) {
    clearTimeout(t);
    clearInterval(t);
    timers.delete(t);
  }
}

function isLoopback(host) {
  return host === 'localhost' || host === '::1' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host);
}

function errnoOf(err) {
  switch (err && err.code) {
    case 'ECONNREFUSED':
      return E.ECONNREFUSED;
    case 'ETIMEDOUT':
      return E.ETIMEDOUT;
    case 'EHOSTUNREACH':
    case 'ENETUNREACH':
    case 'ENOTFOUND':
      return E.EHOSTUNREACH;
    default:
      return E.ECONNRESET;
  }
}

// ---------------------------------------------------------------- sockets

const handles = new Map(); // handle -> state
const lingering = new Set(); // closed by Python, still sending what it had accepted
const LINGER_MS = 2000;
let nextHandle = 1;

function reportSockets() {
  post({ t: 'sockets', open: handles.size });
}

const hostNet = {
  /** A new unconnected socket; returns its handle. */
  open() {
    const h = nextHandle++;
    handles.set(h, { sock: null, state: 'new', chunks: [], buffered: 0, eof: false, errno: 0 });
    reportSockets();
    return h;
  },

  /** Starts a connection. Returns 0 once started, else an errno for Python to raise. */
  connect(h, host, port) {
    const s = handles.get(h);
    if (!s) return E.EBADF;
    if (s.state === 'connecting') return E.EALREADY;
    if (s.state !== 'new') return E.EISCONN;
    s.state = 'connecting';
    if (!isLoopback(host)) {
      // Tests only ever reach this machine; anything else fails like an unreachable host.
      post({ t: 'stderr', line: `tether harness: refused to connect to ${host}:${port} (loopback only)` });
      s.state = 'error';
      s.errno = E.EHOSTUNREACH;
      return 0;
    }
    const sock = net.connect({ host: host === 'localhost' ? '127.0.0.1' : host, port });
    s.sock = sock;
    sock.on('connect', () => {
      if (s.state === 'connecting') s.state = 'open';
    });
    sock.on('data', (d) => {
      s.chunks.push(d);
      s.buffered += d.length;
    });
    sock.on('end', () => {
      s.eof = true;
    });
    sock.on('error', (err) => {
      if (s.state !== 'closed') {
        s.state = 'error';
        s.errno = errnoOf(err);
      }
    });
    sock.on('close', () => {
      // A close with neither FIN nor error (should not happen for a peer) counts as a reset.
      if (s.state === 'open' && !s.eof) {
        s.state = 'error';
        s.errno = E.ECONNRESET;
      }
    });
    return 0;
  },

  /** MP_STREAM_POLL: the subset of flags that are ready (ERR, HUP, NVAL always reported). */
  poll(h, flags) {
    const s = handles.get(h);
    if (!s) return POLLNVAL;
    let ready = 0;
    if (s.buffered > 0) ready |= POLLIN;
    if (s.state === 'error') {
      ready |= POLLERR | POLLHUP;
    } else if (s.eof) {
      ready |= POLLIN | POLLHUP;
    } else if (s.state === 'open' && s.sock.writableLength < SEND_BUFFER) {
      ready |= POLLOUT;
    }
    return ready & (flags | POLLERR | POLLHUP | POLLNVAL);
  },

  /**
   * Up to n buffered bytes as a Uint8Array; null when none yet (would block);
   * 0 at a clean end of stream; -errno after a failure (once the data is drained).
   */
  read(h, n) {
    const s = handles.get(h);
    if (!s) return -E.EBADF;
    if (s.buffered > 0) {
      const out = Buffer.allocUnsafe(Math.min(n, s.buffered));
      let off = 0;
      while (off < out.length) {
        const c = s.chunks[0];
        const k = Math.min(c.length, out.length - off);
        c.copy(out, off, 0, k);
        off += k;
        if (k === c.length) s.chunks.shift();
        else s.chunks[0] = c.subarray(k);
      }
      s.buffered -= out.length;
      return new Uint8Array(out.buffer, out.byteOffset, out.length);
    }
    if (s.state === 'error') return -s.errno;
    if (s.eof) return 0;
    if (s.state === 'new') return -E.ENOTCONN;
    return null;
  },

  /**
   * Sends hex-encoded bytes: how many were accepted (0 when the send buffer is
   * full), null while still connecting, -errno once the link failed or closed.
   */
  write(h, hex) {
    const s = handles.get(h);
    if (!s) return -E.EBADF;
    if (s.state === 'new') return -E.ENOTCONN;
    if (s.state === 'connecting') return null;
    if (s.state === 'error' || s.eof || s.sock.destroyed || !s.sock.writable) return -E.ECONNRESET;
    const room = SEND_BUFFER - s.sock.writableLength;
    if (room <= 0) return 0;
    const data = Buffer.from(hex, 'hex');
    const k = Math.min(room, data.length);
    s.sock.write(k === data.length ? data : data.subarray(0, k));
    return k;
  },

  /**
   * Like lwIP's close: data already accepted still goes out (FIN after it), but
   * the socket is destroyed at the latest LINGER_MS later.
   */
  close(h) {
    const s = handles.get(h);
    if (!s) return;
    const sock = s.sock;
    const graceful = sock && s.state === 'open' && !s.eof && sock.writable;
    s.state = 'closed';
    handles.delete(h);
    reportSockets();
    if (!sock) return;
    if (!graceful) {
      sock.destroy();
      return;
    }
    lingering.add(sock);
    const t = later(LINGER_MS, () => sock.destroy());
    sock.once('close', () => {
      lingering.delete(sock);
      cancel(t);
    });
    sock.end();
  },

  /** For debugging from Python: a short description of a handle. */
  describe(h) {
    const s = handles.get(h);
    return s ? `${s.state} buffered=${s.buffered} eof=${s.eof} errno=${s.errno}` : 'no such handle';
  },
};

function destroyAllSockets() {
  for (const s of handles.values()) if (s.sock) s.sock.destroy();
  handles.clear();
  for (const sock of lingering) sock.destroy();
  lingering.clear();
}

// ---------------------------------------------------------------- WiFi

const wifiOpts = workerData.wifi || {};
const STAT_IDLE = 1000;
const STAT_CONNECTING = 1001;
const STAT_GOT_IP = 1010;
const STAT_NO_AP_FOUND = 201;

const wifi = {
  up: wifiOpts.up !== false,
  delayMs: wifiOpts.connectDelayMs ?? 50,
  stored: wifiOpts.storedCredentials !== false, // ESP8266 keeps credentials in flash
  active: [false, false],
  connected: false,
  joining: false, // wants to be connected (connect() called, or auto-join)
  timer: null,
  ssid: wifiOpts.ssid ?? null,
  connects: 0,
  disconnects: 0,
};

function reportWifi() {
  post({
    t: 'wifi',
    up: wifi.up,
    active: wifi.active[0],
    connected: wifi.connected,
    connects: wifi.connects,
    disconnects: wifi.disconnects,
  });
}

function armJoin() {
  cancel(wifi.timer);
  wifi.timer = null;
  if (!wifi.joining || !wifi.up || !wifi.active[0]) return;
  wifi.timer = later(wifi.delayMs, () => {
    wifi.timer = null;
    if (wifi.joining && wifi.up && wifi.active[0] && !wifi.connected) {
      wifi.connected = true;
      reportWifi();
    }
  });
}

const hostWifi = {
  isActive(i) {
    return !!wifi.active[i];
  },
  setActive(i, on) {
    wifi.active[i] = !!on;
    if (i === 0) {
      if (!on) {
        wifi.connected = false;
        wifi.joining = false;
        armJoin();
      } else if (!wifi.connected && !wifi.joining && wifi.stored) {
        wifi.joining = true; // auto-join with stored credentials
        armJoin();
      }
      reportWifi();
    }
  },
  /** Returns false when the interface is not active (Python raises). */
  connect(ssid, _key) {
    if (!wifi.active[0]) return false;
    wifi.connects++;
    if (ssid !== null && ssid !== undefined) wifi.ssid = String(ssid);
    wifi.connected = false;
    wifi.joining = true;
    armJoin();
    reportWifi();
    return true;
  },
  disconnect() {
    wifi.disconnects++;
    wifi.connected = false;
    wifi.joining = false;
    armJoin();
    reportWifi();
  },
  isConnected() {
    return wifi.connected;
  },
  status() {
    if (!wifi.active[0]) return STAT_IDLE;
    if (wifi.connected) return STAT_GOT_IP;
    if (wifi.joining) return wifi.up ? STAT_CONNECTING : STAT_NO_AP_FOUND;
    return STAT_IDLE;
  },
  ssid() {
    return wifi.ssid;
  },
};

function setWifiUp(up) {
  wifi.up = !!up;
  if (!wifi.up) {
    if (wifi.connected) {
      wifi.connected = false;
      wifi.joining = true; // boards keep trying to rejoin
    }
    armJoin();
  } else {
    armJoin();
  }
  reportWifi();
}

// ---------------------------------------------------------------- machine

const pins = new Map(); // key -> { value, writes, toggles }
const uniqueIdHex = workerData.uniqueIdHex;

const hostMachine = {
  uniqueId() {
    return uniqueIdHex;
  },
  pinRead(key) {
    const p = pins.get(String(key));
    return p ? p.value : 0;
  },
  /** Records a write to a pin. initial: set by the constructor, not counted. */
  pinWrite(key, value, initial) {
    key = String(key);
    const v = value ? 1 : 0;
    let p = pins.get(key);
    if (!p) {
      p = { value: v, writes: 0, toggles: 0 };
      pins.set(key, p);
    } else if (!initial && p.value !== v) {
      p.toggles++;
    }
    if (!initial) p.writes++;
    p.value = v;
    post({ t: 'pin', id: key, value: p.value, writes: p.writes, toggles: p.toggles });
  },
  wdtStart(timeoutMs) {
    post({ t: 'wdt-start', timeoutMs });
  },
  wdtFeed() {
    post({ t: 'wdt-feed', time: Date.now() });
  },
  reset(kind) {
    post({ t: 'reset', kind: String(kind) });
  },
  /** Calls fn every periodMs (or once); returns a handle for timerStop. */
  timerStart(periodMs, periodic, fn) {
    const run = () => {
      try {
        fn();
      } catch (err) {
        post({ t: 'stderr', line: `machine.Timer callback failed: ${err && err.message}` });
      }
    };
    const ms = Math.max(1, periodMs | 0);
    let t;
    if (periodic) {
      t = setInterval(run, ms);
      timers.add(t);
    } else {
      t = later(ms, run);
    }
    const id = nextTimer++;
    timerById.set(id, t);
    return id;
  },
  timerStop(id) {
    cancel(timerById.get(id));
    timerById.delete(id);
  },
};
let nextTimer = 1;
const timerById = new Map();

// ---------------------------------------------------------------- interpreter

let mp = null;
let helper = null;

function errorOf(err) {
  if (err && err.name === 'PythonError') return { type: err.type, message: err.message };
  return { type: (err && err.name) || 'Error', message: String((err && err.stack) || err) };
}

/** A value from the interpreter as JSON text (bytes as {"__bytes__": hex}). */
async function toJson(value) {
  if (value && typeof value.then === 'function') value = await value;
  if (value === undefined || value === null) return 'null';
  const kind = typeof value;
  if (kind === 'string' || kind === 'number' || kind === 'boolean') return JSON.stringify(value);
  if (value instanceof mp.PyProxy || typeof value === 'function') return helper.encode(value);
  return JSON.stringify(String(value));
}

function encodeArg(v) {
  if (v instanceof Uint8Array) return { __bytes__: Buffer.from(v.buffer, v.byteOffset, v.length).toString('hex') };
  if (Array.isArray(v)) return v.map(encodeArg);
  if (v && typeof v === 'object') {
    const out = {};
    for (const [k, x] of Object.entries(v)) out[k] = encodeArg(x);
    return out;
  }
  return v === undefined ? null : v;
}

async function handle(msg) {
  switch (msg.t) {
    case 'run':
      return toJson(await mp.runPythonAsync(msg.code));
    case 'call': {
      const r = helper.invoke(msg.name, JSON.stringify(encodeArg(msg.args)));
      return typeof r === 'string' ? r : await r;
    }
    case 'eval': {
      const r = helper.evaluate(msg.expr);
      return typeof r === 'string' ? r : await r;
    }
    default:
      throw new Error(`unknown request ${msg.t}`);
  }
}

async function main() {
  const { loadMicroPython } = await import('@micropython/micropython-webassembly-pyscript');
  mp = await loadMicroPython({
    heapsize: workerData.heapsize,
    stdout: (line) => post({ t: 'stdout', line }),
    stderr: (line) => post({ t: 'stderr', line }),
  });
  for (const [path, text] of workerData.files) {
    const dir = path.slice(0, path.lastIndexOf('/'));
    if (dir) mp.FS.mkdirTree(dir);
    mp.FS.writeFile(path, text);
  }
  const host = { net: hostNet, wifi: hostWifi, machine: hostMachine };
  mp.registerJsModule('tether_host', host);
  // Also reachable as js.tetherHostNet etc.; this realm belongs to this interpreter alone.
  globalThis.tetherHostNet = hostNet;
  globalThis.tetherHostWifi = hostWifi;
  globalThis.tetherHostMachine = hostMachine;
  helper = mp.pyimport('_tether_harness');

  parentPort.on('message', (msg) => {
    if (msg.t === 'wifi-up') {
      setWifiUp(msg.up);
    } else if (msg.t === 'close') {
      destroyAllSockets();
      for (const t of timers) {
        clearTimeout(t);
        clearInterval(t);
      }
      timers.clear();
      post({ t: 'closed', open: handles.size });
    } else {
      handle(msg).then(
        (json) => post({ t: 'result', id: msg.id, ok: true, json }),
        (err) => post({ t: 'result', id: msg.id, ok: false, error: errorOf(err) }),
      );
    }
  });
  post({ t: 'ready' });
}

main().catch((err) => post({ t: 'fatal', error: errorOf(err) }));
