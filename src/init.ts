/**
 * `tether init [DIR]`: a starter configuration for a real fleet, and a place for
 * its apps. The config stays plain JSON (any tool can read and rewrite it); its
 * notes are keys starting with `$`, which the config loader skips.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { resolveConfig } from './config';

/** The file `tether serve` reads from the working folder when no --config is given. */
export const CONFIG_FILE = 'tether.json';

/** The starter config, notes included. Every value here is also what the README documents as a sensible start. */
export function starterConfig(): Record<string, unknown> {
  return {
    comment:
      'tether configuration for your fleet, written by `tether init`. Keys that start with "$" are notes: tether skips them. ' +
      'Every other key is optional; README.md ("Configuration") lists them all with their defaults. Unknown keys are refused at start, so a typo cannot go unnoticed.',
    $host: 'Address to listen on for boards. "0.0.0.0" is every network interface, so boards on your LAN reach it; "127.0.0.1" would keep it to this machine.',
    host: '0.0.0.0',
    $port: 'TCP port the boards connect to: the port in each board\'s config (8123 is the original micropython-iot default).',
    port: 8123,
    $timeout: 'ms of silence that count as an outage. Boards must use the same value (2000 is the original client\'s default).',
    timeout: 2000,
    $apps:
      'Server-side app scripts, one running instance per board (client ID); paths are relative to this file. ' +
      'apps/hello.js is an example to start from: [{ "script": "apps/hello.js", "clients": "*" }] runs it for every board, ' +
      '"clients": ["lamp-1", "lamp-2"] for some, "type": "light" for a device type (see "types" in README.md). ' +
      'Lines of boards that no app reads are accepted and shown on the dashboard.',
    apps: [],
    $auth:
      'Device secrets, ready to switch on. As written nobody needs one (no device listed, "required" false). To turn it on: ' +
      'run `tether secret ID` for each board, paste the hash it prints into "devices" and give the board ID@secret as its client ID; ' +
      'then set "required" to true, and IDs without an entry are refused. docs/security.md has the details.',
    auth: { devices: {}, required: false },
    $persist:
      'Folder (relative to this file) where messages not yet delivered, or not yet read by an app, are journaled: they survive a restart or a crash. null turns it off.',
    persist: 'journal',
    $http:
      'Dashboard, HTTP API and /metrics. "127.0.0.1" keeps them to this machine; from another computer use ' +
      '`ssh -L 8124:127.0.0.1:8124 USER@THIS-MACHINE` and open http://127.0.0.1:8124/. To open them to the LAN instead, set "host" to "0.0.0.0" ' +
      'AND set "token" to a long random string (e.g. from `openssl rand -hex 24`): sending to boards (POST) then needs it, ' +
      'while reading (GET, the WebSocket, /metrics) stays open to whoever reaches the port.',
    http: { host: '127.0.0.1', port: 8124, token: null },
    $log: 'level: debug, info, warn, error or silent. format: "pretty" (one line per record, for people) or "json" (one object per line, for log tools).',
    log: { level: 'info', format: 'pretty' },
  };
}

/** The example app `tether init` puts in apps/ (plain JavaScript: nothing to compile). */
export const HELLO_APP = `// An example app. tether runs this function once per board (client ID) it is bound to.
// Bind it in tether.json:  "apps": [{ "script": "apps/hello.js", "clients": "*" }]
//
// conn is the board's Connection. It lasts across the board's outages and reboots:
// \`for await\` waits them out, and conn.write() (qos) resolves once the board
// acknowledged the line, however many times it had to be resent on the way.
'use strict';

module.exports = async function hello(conn, ctx) {
  ctx.log.info('hello: serving this board', { board: conn.id });
  for await (const line of conn) {
    const text = line.trimEnd();
    ctx.log.info('hello: board says', { board: conn.id, text });
    await conn.write(JSON.stringify({ echo: text }), { signal: ctx.signal });
  }
};
`;

/** This machine's addresses that boards on the network can use (IPv4, not loopback), with their interface names. */
export function lanAddresses(): { address: string; iface: string }[] {
  let ifaces: NodeJS.Dict<os.NetworkInterfaceInfo[]>;
  try {
    ifaces = os.networkInterfaces();
  } catch {
    return []; // e.g. no netlink socket allowed: the caller says so
  }
  const out: { address: string; iface: string }[] = [];
  for (const [iface, list] of Object.entries(ifaces)) {
    for (const a of list ?? []) if (!a.internal && a.family === 'IPv4') out.push({ address: a.address, iface });
  }
  return out;
}

export interface InitResult {
  config: string;
  wrote: string[];
  kept: string[];
}

/**
 * Writes DIR/tether.json (refusing to replace one unless `force`), DIR/apps/ and
 * the example app (never replaced: it may hold your code by now).
 */
export function initFleet(dir: string, force: boolean): InitResult {
  const abs = path.resolve(dir);
  const config = path.join(abs, CONFIG_FILE);
  if (fs.existsSync(config) && !force) {
    throw new Error(`${config} exists already: edit it, or run \`tether init ${dir === '.' ? '' : dir + ' '}--force\` to replace it with a fresh starter config (apps/ is left as it is)`);
  }
  const text = JSON.stringify(starterConfig(), null, 2) + '\n';
  resolveConfig(JSON.parse(text), config, abs); // what we write must load: a bug here is ours, not the user's
  fs.mkdirSync(path.join(abs, 'apps'), { recursive: true });
  // 0600: the config may later hold the HTTP token.
  fs.writeFileSync(config, text, { mode: 0o600 });
  const wrote = [config];
  const kept: string[] = [];
  const hello = path.join(abs, 'apps', 'hello.js');
  if (fs.existsSync(hello)) kept.push(hello);
  else {
    fs.writeFileSync(hello, HELLO_APP);
    wrote.push(hello);
  }
  return { config, wrote, kept };
}

/** What `tether init` prints after writing: the next steps, with this machine's addresses. */
export function nextSteps(r: InitResult, dir: string): string {
  const cfg = starterConfig() as { port: number; http: { port: number } };
  const lan = lanAddresses();
  const addrs = lan.length > 0 ? lan.map((a) => `${a.address} (${a.iface})`).join(', ') : 'this machine\'s LAN address (none found now: check `ip addr`)';
  const inDir = path.resolve(dir) === process.cwd();
  return [
    ...r.wrote.map((f) => `wrote ${f}`),
    ...r.kept.map((f) => `kept  ${f} (it exists)`),
    '',
    'next:',
    `  1. start it:       ${inDir ? 'tether serve' : `tether serve --config ${r.config}`}`,
    `  2. point your boards at ${addrs}, port ${cfg.port} (the server address and port in each board's config)`,
    `  3. watch them:     http://127.0.0.1:${cfg.http.port}/ on this machine (see "$http" in the config for other machines)`,
    `  apps go in ${path.join(path.dirname(r.config), 'apps')}; bind them under "apps" in the config.`,
    '  to start it at boot: `tether service` prints a systemd unit (docs/raspberry-pi.md has the steps)',
    '',
  ].join('\n');
}
