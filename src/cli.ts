/**
 * The `tether` command: serve, sim, demo, init, service, emulate, chaos, secret. Thin: everything it does is a few calls
 * into the library.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { AppRunner, DeviceFn, LoadedApp, loadApp } from './apps';
import { HTTP_CONFIG_DEFAULTS, loadConfig, resolveConfig, TetherConfig } from './config';
import { HttpApi } from './http';
import { createLogger, Logger } from './log';
import { Fleet } from './fleet';
import { Server } from './server';
import { DataTypeTable } from './telemetry';
import { MeshTransport } from './transports/uart';
import { PtyPair } from './ptypair';
import { spawnSync } from 'node:child_process';
import { sleep } from './util';
import { ChaosProxy, FAULT_KINDS, FaultKind } from './chaos';
import { MqttBridge } from './bridge';
import { DemoOutages, demoLogging, fleetStatus, SimFleet, summary } from './demo';
import { CONFIG_FILE, initFleet, lanAddresses, nextSteps } from './init';
import { serviceUnit, UNIT_DEFAULTS } from './service';
import { packageVersion } from './runtime';

const USAGE = `usage: tether <command> [options]
       tether --version   prints the version

commands:
  serve   run the server with the configured apps
  init    tether init [DIR]: write a starter config for your fleet (DIR/tether.json) and DIR/apps/
  service print a systemd unit that runs tether serve at boot (docs/raspberry-pi.md)
  sim     run simulated devices against a server
  demo    server + example apps + simulated fleet in one process
  emulate play the root node of an ESP mesh on a serial port, with simulated nodes
  chaos   a fault-injecting TCP proxy between devices and a server
  secret  device secrets and their hashes for the config's "auth.devices", for one ID or
          many: tether secret lamp-1 lamp-2 | --ids-from FILE | --count 20 --prefix lamp-
          [--out FILE]; tether secret --help for every option

options (all commands):
  --config FILE      config file (default: ./tether.json if present, else built-in defaults;
                     tether demo: the demo's own, examples/demo.json)
  --port N           override the config's port (0 = any free port, logged)
  --log-level LEVEL  debug | info | warn | error | silent
  --log-format F     pretty | json
serve / demo:
  --host ADDR        address to listen on (overrides the config's host)
  --app FILE[=IDS]   add an app script; IDS is a comma list or * (repeatable)
  --duration S       stop after S seconds (default: run until Ctrl-C)
  --http-port N      port of the HTTP API and dashboard (default: the config's "http", else 8124 on
                     127.0.0.1; 0 = any free port; the URL is logged)
demo:
  --outage-every S   every S seconds one simulated device loses its WiFi just as a message to it
                     is on its way (default 15, 0 = never)
  --verbose          also print every app's and every simulated device's lines (default: the
                     server's view only)
init:
  DIR                folder to write tether.json and apps/ into (default: the current folder)
  --force            replace an existing DIR/tether.json (apps/ is never overwritten)
service:
  --dir DIR          folder of tether.json, apps/ and the journal (default /var/lib/tether)
  --user NAME        system user to run as (default tether)
sim:
  --server ADDR      server address (overrides the config's server)
  --clients N        simulate N devices sim-1..sim-N (default: the config's clients)
  --ids A,B,C        simulate exactly these IDs
  --app FILE         run the device half of this app script on each device
emulate:
  --serial PATH      serial port to play the mesh root on (required); without
                     hardware make a pty pair: socat -d -d pty,raw,echo=0,link=/tmp/mesh-root pty,raw,echo=0,link=/tmp/mesh-server
  --baud N           baud rate (default 115200)
  --nodes N          simulate N mesh nodes mesh-1..mesh-N (default 3, 0 with --replay)
  --ids A,B,C        simulate exactly these node IDs
  --app FILE         run the device half of this app script on each node (default: a chatter)
  --timeout MS       line-protocol timeout of the nodes (default: the config's, 2000)
  --data-types FILE  data-type table for DATA frames (e.g. examples/data-types.json)
  --data-every MS    send a DATA frame of random plausible values per node every MS
  --churn-every S    every S seconds a random node leaves the mesh and rejoins a few seconds later
  --reset-every S    reset the mesh root every S seconds
  --record FILE      append every chunk written to the port to FILE as JSON lines {"t":ms,"hex":"..."}
  --replay FILE      write a recorded dump to the port (exits when done if there are no nodes)
  --speed X          replay speed factor (default 1; 0 = as fast as possible)
  --duration S       stop after S seconds (default: run until Ctrl-C)
chaos:
  --target HOST:PORT the server to forward to (required)
  --listen PORT      port devices connect to (default 0: any free port, printed)
  --listen-host ADDR address to listen on (default 127.0.0.1; anything else exposes it)
  --seed N           seed of the fault schedule (default: random, printed)
  --every MS         mean ms between random faults (default 2000; 0 = none)
  --kinds LIST       fault kinds to pick from: cut,blackhole,delay,split (default all)
  --blackhole-ms MS  how long a blackhole lasts before the link is cut (default 3000)
  --delay-ms MS      how long a delay holds each chunk back (default 300)
  --delay-for-ms MS  how long a delay period lasts (default 2000)
  --split-ms MS      how long a split period (one byte per write) lasts (default 2000)
  --duration S       stop after S seconds (default: run until Ctrl-C); the counts are printed at exit
`;

interface Opts {
  config?: string;
  port?: string;
  host?: string;
  server?: string;
  app?: string[];
  clients?: string;
  ids?: string;
  duration?: string;
  'outage-every'?: string;
  'log-level'?: string;
  'log-format'?: string;
  'http-port'?: string;
  serial?: string;
  baud?: string;
  nodes?: string;
  timeout?: string;
  'data-types'?: string;
  'data-every'?: string;
  'churn-every'?: string;
  'reset-every'?: string;
  record?: string;
  replay?: string;
  speed?: string;
  target?: string;
  listen?: string;
  'listen-host'?: string;
  seed?: string;
  every?: string;
  kinds?: string;
  'blackhole-ms'?: string;
  'delay-ms'?: string;
  'delay-for-ms'?: string;
  'split-ms'?: string;
  verbose?: boolean;
  force?: boolean;
  dir?: string;
  user?: string;
  help?: boolean;
}

const LOG_LEVELS = ['debug', 'info', 'warn', 'error', 'silent'];
const LOG_FORMATS = ['pretty', 'json'];
const isPort = (n: number) => Number.isInteger(n) && n >= 0 && n <= 65535;

/**
 * Where a command's config comes from: --config FILE; for `tether demo` the demo's own
 * (examples/demo.json); else ./tether.json if there is one; else none (built-in defaults).
 */
function configFile(o: Opts, cmd: string): string | undefined {
  if (o.config !== undefined) return o.config;
  if (cmd === 'demo') return demoConfigFile();
  return fs.existsSync(CONFIG_FILE) ? CONFIG_FILE : undefined;
}

/** examples/demo.json beside the example apps this code runs with (source checkout or build), else the package's. */
function demoConfigFile(): string {
  const candidates = [path.join(__dirname, '..', 'examples', 'demo.json'), path.join(__dirname, '..', '..', 'examples', 'demo.json')];
  const found = candidates.find((f) => fs.existsSync(f));
  if (!found) throw new Error(`the demo's config is missing (looked for ${candidates.join(' and ')}): reinstall tether, or pass --config FILE with "apps"`);
  return found;
}

function readConfig(o: Opts, cmd = 'serve'): TetherConfig {
  // Flags first, each blamed on itself: a bad --port is not the config file's fault.
  const port = numOpt(o, 'port', 'a port number (0-65535; 0 = any free port)', isPort);
  const httpPort = numOpt(o, 'http-port', 'a port number (0-65535; 0 = any free port)', isPort);
  for (const name of ['host', 'server'] as const) {
    const v = o[name];
    if (v !== undefined && (v.trim() === '' || /\s/.test(v))) throw new Error(`--${name} must be an address like 0.0.0.0, 127.0.0.1 or a host name, got ${JSON.stringify(v)}`);
  }
  if (o['log-level'] !== undefined && !LOG_LEVELS.includes(o['log-level'])) {
    throw new Error(`--log-level must be one of ${LOG_LEVELS.join(', ')}, got ${JSON.stringify(o['log-level'])}`);
  }
  if (o['log-format'] !== undefined && !LOG_FORMATS.includes(o['log-format'])) {
    throw new Error(`--log-format must be one of ${LOG_FORMATS.join(', ')}, got ${JSON.stringify(o['log-format'])}`);
  }
  const file = configFile(o, cmd);
  const cfg = file ? loadConfig(file) : resolveConfig({});
  const over: Record<string, unknown> = {};
  if (port !== undefined) over.port = port;
  if (o.host !== undefined) over.host = o.host;
  if (o.server !== undefined) over.server = o.server;
  // The command line wins over the config, even over "http": null.
  if (httpPort !== undefined) over.http = { ...(cfg.http ?? HTTP_CONFIG_DEFAULTS), port: httpPort };
  const log = { ...cfg.log };
  if (o['log-level']) log.level = o['log-level'] as typeof log.level;
  if (o['log-format']) log.format = o['log-format'] as typeof log.format;
  const { baseDir, ...rest } = cfg;
  return resolveConfig({ ...rest, ...over, log }, file ?? 'command line', baseDir);
}

/** A ./local.json next to no ./tether.json was the config before tether.json: say it is not read. */
function warnStaleLocalJson(o: Opts, log: Logger): void {
  if (o.config === undefined && !fs.existsSync(CONFIG_FILE) && fs.existsSync('local.json')) {
    log.warn('./local.json is not read by default: the config file tether serve looks for is ./tether.json', {
      hint: 'rename it to tether.json, or pass --config local.json; running with the built-in defaults meanwhile',
    });
  }
}

function makeLogger(cfg: TetherConfig): Logger {
  return createLogger({ level: cfg.log.level, format: cfg.log.format, stream: process.stdout });
}

function appsFrom(cfg: TetherConfig, o: Opts): LoadedApp[] {
  const apps = cfg.apps.map((a) => loadApp(path.resolve(cfg.baseDir, a.script), a.clients, a.type));
  for (const arg of o.app ?? []) {
    const [file, idList] = arg.split('=');
    const ids = idList === undefined ? undefined : idList === '*' ? '*' : idList.split(',').filter(Boolean);
    apps.push(loadApp(file, ids));
  }
  return apps;
}

function serverOptions(cfg: TetherConfig, log: Logger) {
  const expected = cfg.clients.length > 0 ? cfg.clients : undefined;
  const p = cfg.persist;
  const persist = p === null ? null : typeof p === 'string' ? path.resolve(cfg.baseDir, p) : { ...p, dir: path.resolve(cfg.baseDir, p.dir) };
  return { ...cfg, expected, persist, logger: log };
}

/** Resolves on SIGINT/SIGTERM or after `duration` seconds. */
function untilStopped(duration: number | undefined, log: Logger): Promise<void> {
  return new Promise((resolve) => {
    const done = (why: string) => {
      process.off('SIGINT', onInt);
      process.off('SIGTERM', onTerm);
      clearTimeout(timer);
      log.info('stopping', { why });
      resolve();
    };
    const onInt = () => done('SIGINT');
    const onTerm = () => done('SIGTERM');
    process.once('SIGINT', onInt);
    process.once('SIGTERM', onTerm);
    const timer = duration ? setTimeout(() => done(`--duration ${duration}s elapsed`), duration * 1000) : undefined;
  });
}

/** How long a shutdown may take before the process exits anyway (deploy/tether.service allows 15 s). */
export const SHUTDOWN_LIMIT_MS = 5000;

/**
 * Bounds the shutdown that follows a stop: past SHUTDOWN_LIMIT_MS, or at another
 * SIGINT/SIGTERM, the process exits with code 1. A signal within a second of the
 * first is the same Ctrl-C delivered twice (npm forwards it to its child, which the
 * terminal already signalled) and is ignored.
 */
function shutdownGuard(log: Logger): { done(): void } {
  const since = Date.now();
  const force = (why: string) => {
    log.error(`${why}: exiting before the shutdown finished`, {
      hint: 'journaled messages are safe (every record is written as it happens); an app that ignores ctx.signal can hold a shutdown up',
    });
    process.exit(1);
  };
  const timer = setTimeout(() => force(`the shutdown took longer than ${SHUTDOWN_LIMIT_MS / 1000} s`), SHUTDOWN_LIMIT_MS);
  timer.unref();
  const again = (sig: string) => {
    if (Date.now() - since >= 1000) force(`a second ${sig}`);
  };
  const onInt = () => again('SIGINT');
  const onTerm = () => again('SIGTERM');
  process.on('SIGINT', onInt);
  process.on('SIGTERM', onTerm);
  return {
    done() {
      clearTimeout(timer);
      process.off('SIGINT', onInt);
      process.off('SIGTERM', onTerm);
    },
  };
}

const isWildcard = (host: string) => host === '0.0.0.0' || host === '::';
const isLoopback = (host: string) => host === 'localhost' || host === '::1' || host.startsWith('127.');

/**
 * Where boards and browsers reach this server. On 0.0.0.0 the server has no one
 * address of its own: the machine's LAN addresses are what to give the boards.
 */
function announce(cfg: TetherConfig, server: Server, api: HttpApi | null, log: Logger): void {
  const lan = isWildcard(cfg.host) || (api && isWildcard(cfg.http?.host ?? '')) ? lanAddresses() : [];
  if (isWildcard(cfg.host)) {
    if (lan.length > 0) {
      log.info(`boards connect to ${lan.map((a) => `${a.address}:${server.port}`).join(', ')}`, { interfaces: lan.map((a) => a.iface).join(',') });
    } else {
      log.warn('listening on every interface, but this machine has no LAN address now: boards cannot reach it until it has one', {
        hint: 'check the network connection (ip addr)',
      });
    }
  }
  if (!api || !cfg.http) return;
  const fields: Record<string, unknown> = { api: `${api.url}api/devices`, metrics: `${api.url}metrics` };
  if (isWildcard(cfg.http.host) && lan.length > 0) {
    fields.lan = lan.map((a) => `${cfg.http!.tls ? 'https' : 'http'}://${a.address}:${api.port}/`).join(' ');
  }
  log.info(`dashboard: ${api.url}`, fields);
  if (isWildcard(cfg.host) && isLoopback(cfg.http.host)) {
    const at = lan[0]?.address ?? 'THIS-MACHINE';
    log.info(`the dashboard is on this machine only (http.host ${cfg.http.host})`, {
      hint: `from another computer: ssh -L ${api.port}:127.0.0.1:${api.port} USER@${at}, then open http://127.0.0.1:${api.port}/; or set http.host to "0.0.0.0" together with http.token`,
    });
  }
}

/** A device that says hello every few seconds and logs what it receives. */
const chatter: DeviceFn = async (client, ctx) => {
  const reader = (async () => {
    for await (const line of client) ctx.log.info('device received', { line: line.trimEnd() });
  })();
  for (let n = 1; !ctx.signal.aborted; n++) {
    await client.write(JSON.stringify({ hello: n, connects: client.connects }), { signal: ctx.signal }).catch(() => {});
    await sleep(3000, ctx.signal);
  }
  await reader;
};

interface DemoMesh {
  emu: import('./emulator').MeshRootEmulator;
  close(): Promise<void>;
}

/**
 * For the demo: a simulated mesh root on a real pty pair (socat), with the
 * server's UART transport on the other end. Null (and a hint) without socat.
 */
async function startDemoMesh(server: Server, cfg: TetherConfig, log: Logger): Promise<DemoMesh | null> {
  if (spawnSync('socat', ['-V']).error) {
    log.info('socat not found: the mesh-* devices run over TCP instead of a simulated UART mesh (apt-get install socat)');
    return null;
  }
  const { MeshRootEmulator } = require('./emulator') as typeof import('./emulator');
  const pty = await PtyPair.open('demo');
  const dataTypes = DataTypeTable.load(path.join(__dirname, '..', 'examples', 'data-types.json'));
  const mesh = new MeshTransport(server, { path: pty.a, baudRate: 921600, dataTypes });
  await mesh.open();
  const emu = await MeshRootEmulator.open({
    path: pty.b,
    baudRate: 921600,
    timeout: cfg.timeout,
    dataTypes,
    dataEvery: 7000,
    logger: log.child({ side: 'mesh-root' }),
  });
  log.info('demo mesh: a simulated mesh root on a pty pair, its nodes are mesh-*', { serial: pty.a });
  return {
    emu,
    async close() {
      await emu.close();
      await mesh.close();
      await pty.close();
    },
  };
}

async function serve(o: Opts, withFleet: boolean): Promise<void> {
  const cfg = readConfig(o, withFleet ? 'demo' : 'serve');
  const duration = numOpt(o, 'duration', 'a number of seconds > 0', (n) => n > 0);
  const every = numOpt(o, 'outage-every', 'a number of seconds (0 = never)', (n) => n >= 0) ?? 15;
  if (!withFleet && (o['outage-every'] !== undefined || o.verbose)) {
    throw new Error(`--${o.verbose ? 'verbose' : 'outage-every'} goes with tether demo; tether serve logs what the config's "log" section says`);
  }
  const demoLog = withFleet ? demoLogging({ level: cfg.log.level, format: cfg.log.format, verbose: !!o.verbose }) : null;
  const log = demoLog?.log ?? makeLogger(cfg);
  if (!withFleet) warnStaleLocalJson(o, log);
  // Listening for the stop from the start: a Ctrl-C or SIGTERM during start-up still shuts down in order.
  // The bound on the shutdown takes over the signals at once (a second one may come while start-up finishes).
  const stopped = untilStopped(duration, log).then(() => shutdownGuard(log));
  const apps = appsFrom(cfg, o);
  if (withFleet && apps.length === 0) {
    throw new Error('the demo needs apps: add "apps" to the config (see examples/demo.json) or pass --app');
  }
  const server = await Server.listen(serverOptions(cfg, log));
  let mesh: MeshTransport | null = null;
  if (cfg.mesh) {
    const { dataTypes, ...meshOpts } = cfg.mesh;
    mesh = new MeshTransport(server, {
      ...meshOpts,
      dataTypes: dataTypes ? path.resolve(cfg.baseDir, dataTypes) : undefined,
    });
    void mesh.open(); // logs and retries until the port is there
  }
  const fleet = new Fleet(server, cfg.types, { maxPendingSends: cfg.maxPendingSends, maxPendingBytes: cfg.maxPendingBytes });
  let bridge: MqttBridge | null = null;
  if (cfg.mqtt) {
    bridge = new MqttBridge(server, { ...cfg.mqtt, logger: log });
    if (apps.length > 0) {
      log.warn('with "mqtt" on, every device line goes to the broker: local apps can write to devices but will not read their lines', {
        hint: 'run apps against the broker (examples/broker-app.ts), or remove "mqtt"',
      });
    }
  }
  let api: HttpApi | null = null;
  if (cfg.http) {
    api = new HttpApi({ server, fleet, ...cfg.http, bridge, logger: log });
    try {
      await api.listen();
    } catch (e) {
      await api.close();
      await mesh?.close();
      await server.close();
      throw e;
    }
  }
  const runner = new AppRunner(server, log, fleet, cfg.appRestart);
  // An app's error costs that app instance (restarted after a pause), never the process.
  runner.guardProcess();
  api?.setApps(runner);
  for (const app of apps) runner.add(app);
  // Lines of devices no app reads are accepted and shown (dashboard, API, MQTT), not left to pile up.
  runner.acceptUnclaimed();
  // Devices are served meanwhile: their lines wait (un-ACKed) until the broker is there.
  bridge?.start().catch((e) => log.error('MQTT bridge failed to start', { error: (e as Error).message }));

  let sims: SimFleet | null = null;
  let outages: DemoOutages | null = null;
  let status: NodeJS.Timeout | undefined;
  let demoMesh: DemoMesh | null = null;
  if (withFleet) {
    sims = new SimFleet({ host: cfg.server, port: server.port, timeout: cfg.timeout, maxLineLength: cfg.maxLineLength, radios: true }, demoLog!.devices);
    const wantsMesh = apps.some((a) => a.clients !== '*' && a.clients.some((id) => id.startsWith('mesh-')));
    if (wantsMesh) demoMesh = await startDemoMesh(server, cfg, log);
    for (const app of apps) {
      if (app.clients === '*') continue;
      for (const id of app.clients) {
        if (demoMesh && id.startsWith('mesh-')) demoMesh.emu.addNode(id, app.device ?? chatter);
        else sims.start(id, app.device ?? chatter);
      }
    }
    outages = new DemoOutages(server, sims, log, cfg.timeout);
    outages.start(every * 1000);
    status = setInterval(() => log.info(fleetStatus(server)), 15_000);
    log.info(`demo running: apps and simulated devices exchange messages; Ctrl-C to stop${o.verbose ? '' : ' (--verbose shows every line of the apps and devices)'}`, {
      devices: sims.devices.size + (demoMesh ? demoMesh.emu.nodes().length : 0),
      port: server.port,
      outageEvery: every > 0 ? `${every} s` : 'never',
    });
  }
  announce(cfg, server, api, log);
  // Shutdown: stop taking links, stop the apps, close the links and the journal; bounded.
  const guard = await stopped;
  demoLog?.stopping();
  server.stopAccepting();
  clearInterval(status);
  const table = summary(server); // the state when the stop came; the shutdown below closes every link
  if (withFleet) log.info(fleetStatus(server));
  await outages?.close();
  await api?.close();
  await bridge?.close();
  await sims?.close();
  await demoMesh?.close();
  const appsDone = runner.close();
  await mesh?.close();
  await server.close();
  await appsDone;
  guard.done();
  process.stdout.write(`\nclients when the stop came (the shutdown then closed their links):\n${table}\n`);
}

async function sim(o: Opts): Promise<void> {
  const cfg = readConfig(o, 'sim');
  const log = makeLogger(cfg);
  const count = numOpt(o, 'clients', 'a whole number of devices (1-100000)', (n) => Number.isInteger(n) && n >= 1 && n <= 100_000);
  const duration = numOpt(o, 'duration', 'a number of seconds > 0', (n) => n > 0);
  let ids: string[];
  if (o.ids) ids = o.ids.split(',').filter(Boolean);
  else if (count !== undefined) ids = Array.from({ length: count }, (_, i) => `sim-${i + 1}`);
  else ids = cfg.clients;
  if (ids.length === 0) throw new Error('no devices to simulate: pass --clients N or --ids a,b or list "clients" in the config');
  const fn = o.app?.[0] ? (loadApp(o.app[0]).device ?? chatter) : chatter;
  const sims = new SimFleet({ host: cfg.server, port: cfg.port, timeout: cfg.timeout, maxLineLength: cfg.maxLineLength }, log);
  for (const id of ids) sims.start(id, fn);
  log.info('simulating devices', { devices: ids.length, server: `${cfg.server}:${cfg.port}` });
  await untilStopped(duration, log);
  await sims.close();
}

/** A numeric option, or an error that names it and says what it takes. */
function numOpt(o: Opts, name: keyof Opts, what: string, ok: (n: number) => boolean): number | undefined {
  const raw = o[name];
  if (raw === undefined) return undefined;
  const n = Number(raw);
  if (typeof raw !== 'string' || raw.trim() === '' || Number.isNaN(n) || !ok(n)) {
    throw new Error(`--${name} must be ${what}, got ${JSON.stringify(raw)}`);
  }
  return n;
}

async function emulate(o: Opts): Promise<void> {
  if (!o.serial) {
    throw new Error(
      'emulate needs --serial PATH, the serial port the mesh root sits on. Without hardware, make a pty pair: ' +
        'socat -d -d pty,raw,echo=0,link=/tmp/mesh-root pty,raw,echo=0,link=/tmp/mesh-server ' +
        '(then --serial /tmp/mesh-root here, and the server on /tmp/mesh-server)',
    );
  }
  const cfg = readConfig(o);
  const log = makeLogger(cfg);
  const nonNeg = (n: number) => n >= 0;
  const count = numOpt(o, 'nodes', 'a whole number of nodes (0-1000)', (n) => Number.isInteger(n) && n >= 0 && n <= 1000);
  const baudRate = numOpt(o, 'baud', 'a positive whole number', (n) => Number.isInteger(n) && n > 0);
  const timeout = numOpt(o, 'timeout', 'a whole number of ms >= 4 (the same as the server\'s)', (n) => Number.isInteger(n) && n >= 4) ?? cfg.timeout;
  const dataEvery = numOpt(o, 'data-every', 'a number of ms (0 = off, else >= 10)', (n) => n === 0 || n >= 10) ?? 0;
  const churnEvery = numOpt(o, 'churn-every', 'a number of seconds (0 = off, else >= 0.1)', (n) => n === 0 || n >= 0.1) ?? 0;
  const resetEvery = numOpt(o, 'reset-every', 'a number of seconds (0 = off, else >= 0.1)', (n) => n === 0 || n >= 0.1) ?? 0;
  const speed = numOpt(o, 'speed', 'a number >= 0 (1 = recorded pace, 0 = as fast as possible)', nonNeg) ?? 1;
  const duration = numOpt(o, 'duration', 'a number of seconds > 0', (n) => n > 0);
  if (o.speed !== undefined && !o.replay) throw new Error('--speed goes with --replay FILE');
  let dataTypes: DataTypeTable | undefined;
  if (o['data-types']) dataTypes = DataTypeTable.load(o['data-types']);
  if (dataEvery > 0 && !dataTypes) throw new Error('--data-every needs --data-types FILE (e.g. examples/data-types.json)');

  let ids: string[];
  if (o.ids) ids = o.ids.split(',').filter(Boolean);
  else ids = Array.from({ length: count ?? (o.replay ? 0 : 3) }, (_, i) => `mesh-${i + 1}`);
  const fn = o.app?.[0] ? loadApp(o.app[0]).device : undefined;
  if (o.app?.[0] && !fn) throw new Error(`app ${o.app[0]} exports no device half (export async function device(client, ctx))`);

  // Loaded here so that the other commands never load the serial port's native binding.
  const { MeshRootEmulator } = require('./emulator') as typeof import('./emulator');
  const emu = await MeshRootEmulator.open({
    path: o.serial,
    baudRate,
    timeout,
    dataTypes,
    dataEvery,
    churnEvery: churnEvery * 1000,
    resetEvery: resetEvery * 1000,
    record: o.record,
    clientOptions: { maxLineLength: cfg.maxLineLength },
    logger: log.child({ side: 'mesh' }),
  });
  const lost = new Promise<string>((resolve) => emu.once('lost', resolve));
  try {
    for (const id of ids) emu.addNode(id, fn);
    if (ids.length > 0) log.info('mesh nodes joining', { nodes: ids.join(','), timeout });
    const stopped = untilStopped(duration, log);
    const waits: Promise<unknown>[] = [stopped, lost];
    if (o.replay) {
      const replayed = emu.replay(o.replay, { speed }).then((r) => {
        log.info('replay done', { ...r });
        return r;
      });
      // Only a replay: the command ends with it (unless --duration says otherwise).
      waits.push(ids.length === 0 && duration === undefined ? replayed : replayed.then(() => new Promise(() => {})));
    }
    const why = await Promise.race(waits);
    if (typeof why === 'string') throw new Error(`emulator stopped, ${why}: did socat or the serial adapter go away?`);
  } finally {
    await emu.close();
  }
  const s = emu.stats;
  const cmds = Object.entries(s.commands)
    .map(([c, n]) => `${c}=${n}`)
    .join(' ');
  process.stdout.write(
    `\nframes out ${s.framesOut} (${s.bytesOut} bytes), frames in ${s.framesIn}, dropped ${s.framesDropped}\n` +
      `commands ${cmds || 'none'}; results S ${s.resultsOk} F ${s.resultsFailed}, silent ${s.silenced}\n` +
      `node ups ${s.nodeUps}, node downs ${s.nodeDowns}, root resets ${s.rootResets}, DATA frames ${s.dataFrames}\n`,
  );
}

async function chaos(o: Opts): Promise<void> {
  const m = /^(.+):(\d+)$/.exec(o.target ?? '');
  if (!m) throw new Error('chaos needs --target HOST:PORT, the server to forward to (e.g. --target 127.0.0.1:8123)');
  const targetHost = m[1].replace(/^\[(.*)\]$/, '$1');
  const targetPort = Number(m[2]);
  const ms = (name: keyof Opts, min = 1) => numOpt(o, name, `a number of ms >= ${min}`, (n) => n >= min);
  const kinds = o.kinds?.split(',').filter(Boolean);
  const bad = kinds?.filter((k) => !(FAULT_KINDS as readonly string[]).includes(k)) ?? [];
  if (kinds && (kinds.length === 0 || bad.length > 0)) {
    throw new Error(`--kinds takes a comma list of ${FAULT_KINDS.join(', ')}, got ${JSON.stringify(o.kinds)}`);
  }
  const duration = numOpt(o, 'duration', 'a number of seconds > 0', (n) => n > 0);
  const cfg = readConfig(o);
  const log = makeLogger(cfg);
  const proxy = await ChaosProxy.start({
    listenHost: o['listen-host'] ?? '127.0.0.1',
    listenPort: numOpt(o, 'listen', 'a port number (0-65535)', (n) => Number.isInteger(n) && n >= 0 && n <= 65535) ?? 0,
    targetHost,
    targetPort,
    seed: numOpt(o, 'seed', 'a whole number >= 0', (n) => Number.isInteger(n) && n >= 0),
    every: ms('every', 0) ?? 2000,
    kinds: kinds as FaultKind[] | undefined,
    blackholeMs: ms('blackhole-ms'),
    delayMs: ms('delay-ms'),
    delayForMs: ms('delay-for-ms'),
    splitMs: ms('split-ms'),
    logger: log,
  });
  process.stdout.write(`chaos proxy on ${o['listen-host'] ?? '127.0.0.1'}:${proxy.port} → ${targetHost}:${targetPort}, seed ${proxy.seed}\n`);
  await untilStopped(duration, log);
  await proxy.close();
  const f = proxy.injected;
  process.stdout.write(
    `\nfaults injected: ${proxy.total} (cut ${f.cut}, blackhole ${f.blackhole}, delay ${f.delay}, split ${f.split}); ` +
      `${proxy.missed} found no live connection; ${proxy.accepted} connections proxied; seed ${proxy.seed}\n`,
  );
}

/** `tether init [DIR]`: the starter config and apps/ folder, then what to do next. */
function initCommand(dir: string, o: Opts): number {
  const r = initFleet(dir, !!o.force);
  process.stdout.write(nextSteps(r, dir));
  return 0;
}

/** `tether service`: the systemd unit for this installation (node and tether as found now), on stdout. */
function serviceCommand(o: Opts): number {
  const script = process.argv[1] ? fs.realpathSync(process.argv[1]) : undefined;
  const exec = script ? [process.execPath, script] : UNIT_DEFAULTS.exec;
  const dir = o.dir ?? UNIT_DEFAULTS.dir;
  if (!path.isAbsolute(dir)) throw new Error(`--dir must be an absolute path (systemd needs one), got ${JSON.stringify(dir)}`);
  if (o.user !== undefined && !/^[a-z_][a-z0-9_-]*\$?$/i.test(o.user)) throw new Error(`--user must be a user name like tether, got ${JSON.stringify(o.user)}`);
  process.stdout.write(serviceUnit({ dir, user: o.user, exec }));
  if (exec.some((p) => /^\/(home|root)\//.test(p))) {
    process.stderr.write(
      `tether service: node or tether lives in a home folder (${exec.join(' ')}), as with nvm: the service user ` +
        `(${o.user ?? UNIT_DEFAULTS.user}) must be able to read it. Install Node from NodeSource and tether with npm install -g for a service, ` +
        'or pass --user with your own user name (docs/raspberry-pi.md)\n',
    );
  }
  return 0;
}

/**
 * `tether secret ID… | --ids-from FILE | --count N --prefix P`: device secrets, one board or a
 * fleet at once (src/secret-command.ts, loaded only for this command).
 */
function secretCommand(args: string[]): number {
  return (require('./secret-command') as typeof import('./secret-command')).secretCommand(args);
}

export async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (cmd === '--version' || cmd === '-v' || cmd === 'version') {
    process.stdout.write(`${packageVersion()}\n`);
    return 0;
  }
  if (cmd === 'secret') {
    try {
      return secretCommand(rest);
    } catch (e) {
      process.stderr.write(`tether secret: ${(e as Error).message}\n`);
      return 2;
    }
  }
  let o: Opts;
  let positionals: string[];
  try {
    ({ values: o, positionals } = parseArgs({
      args: rest,
      allowPositionals: true,
      options: {
        config: { type: 'string' },
        port: { type: 'string' },
        host: { type: 'string' },
        server: { type: 'string' },
        app: { type: 'string', multiple: true },
        clients: { type: 'string' },
        ids: { type: 'string' },
        duration: { type: 'string' },
        'outage-every': { type: 'string' },
        'log-level': { type: 'string' },
        'log-format': { type: 'string' },
        'http-port': { type: 'string' },
        serial: { type: 'string' },
        baud: { type: 'string' },
        nodes: { type: 'string' },
        timeout: { type: 'string' },
        'data-types': { type: 'string' },
        'data-every': { type: 'string' },
        'churn-every': { type: 'string' },
        'reset-every': { type: 'string' },
        record: { type: 'string' },
        replay: { type: 'string' },
        speed: { type: 'string' },
        target: { type: 'string' },
        listen: { type: 'string' },
        'listen-host': { type: 'string' },
        seed: { type: 'string' },
        every: { type: 'string' },
        kinds: { type: 'string' },
        'blackhole-ms': { type: 'string' },
        'delay-ms': { type: 'string' },
        'delay-for-ms': { type: 'string' },
        'split-ms': { type: 'string' },
        verbose: { type: 'boolean' },
        force: { type: 'boolean' },
        dir: { type: 'string' },
        user: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    }) as { values: Opts; positionals: string[] });
  } catch (e) {
    process.stderr.write(`tether: ${(e as Error).message}\n\n${USAGE}`);
    return 2;
  }
  if (o.help || !cmd || cmd === 'help') {
    process.stdout.write(USAGE);
    return cmd ? 0 : 2;
  }
  if (positionals.length > (cmd === 'init' ? 1 : 0)) {
    const what = cmd === 'init' ? 'one folder' : 'no arguments besides its options';
    process.stderr.write(`tether ${cmd}: takes ${what}, got ${positionals.map((a) => JSON.stringify(a)).join(' ')}\n\n${USAGE}`);
    return 2;
  }
  try {
    if (cmd === 'init') return initCommand(positionals[0] ?? '.', o);
    if (cmd === 'service') return serviceCommand(o);
    if (cmd === 'serve') await serve(o, false);
    else if (cmd === 'demo') await serve(o, true);
    else if (cmd === 'sim') await sim(o);
    else if (cmd === 'emulate') await emulate(o);
    else if (cmd === 'chaos') await chaos(o);
    else {
      process.stderr.write(`tether: unknown command "${cmd}"\n\n${USAGE}`);
      return 2;
    }
    return 0;
  } catch (e) {
    process.stderr.write(`tether: ${(e as Error).message}\n`);
    return 1;
  }
}

