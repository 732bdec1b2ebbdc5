/**
 * The MQTT bridge: every Connection of this gateway is mirrored onto a broker,
 * so many gateways serve one fleet and apps run anywhere the broker reaches.
 *
 * Topics under `<prefix>/`:
 *   <id>/up                  every line the device sends (QoS 1 or 2); MQTT 5 user
 *                            properties `mid` (the device's message id) and `gw`
 *   <id>/down                lines for the device; the gateway holding its link
 *                            subscribes and writes them with qos. User property
 *                            `msg` (optional) names the message for its receipt
 *   <id>/receipt             `msg` of a down line once the device ACKed it
 *   <id>/status              retained JSON: state up/down, gateway, counters
 *   <id>/telemetry/<name>    retained JSON { t, v } per sample
 *   gateways/<gw>            retained JSON { state: online|offline }; the broker
 *                            publishes `offline` (the last will) if the gateway dies
 *
 * Delivery up: the device's message is ACKed on the wire only once the broker
 * has acknowledged the publish (PUBACK/PUBCOMP), so a message a device saw
 * acknowledged is already at the broker: a gateway that dies or a broker that is
 * away loses none of them. See docs/scale-out.md for every hop.
 */
import { EventEmitter } from 'node:events';
import * as fs from 'node:fs';
import * as os from 'node:os';
import type { IClientOptions, MqttClient } from 'mqtt';
import { loadMqtt } from './mqtt-load';
import type { Connection } from './connection';
import { TetherError } from './errors';
import { throttledWarn } from './limits';
import { silentLogger } from './log';
import type { Logger } from './log';
import type { Server } from './server';

export interface BridgeOptions {
  /** Broker URL: `mqtt://host:1883`, `mqtts://host:8883`. */
  url: string;
  username?: string;
  password?: string;
  /** PEM files for `mqtts://`: the CA to trust, and a client certificate and key if the broker wants one. */
  tls?: { ca?: string; cert?: string; key?: string } | null;
  /** First level of every topic. Default `tether`. */
  prefix?: string;
  /** MQTT QoS of up, down, receipt and status messages: 1 (at least once, deduplicated by tether) or 2. Default 1. */
  qos?: 1 | 2;
  /** This gateway's name on the broker (status, last will, client id). Default `<hostname>-<port>`. */
  gateway?: string;
  /** Device messages waiting for the broker (while it is away) before further ones are refused without ACK (the devices resend them). Default 10000. */
  maxQueue?: number;
  /** Publish telemetry samples. Default true. */
  telemetry?: boolean;
  /**
   * After the broker connection comes back, publish again the up lines of the
   * last `replayWindow` ms before it dropped (at most 32 per device), once
   * `replayDelay` ms have passed, and the lines published since (at most 96 per
   * device): a broker that acknowledged a line and then restarted may have lost
   * it before its subscribers had it, and subscribers may not be back yet when
   * the first lines after the restart arrive. Subscribers drop what they
   * already had by the message id (BrokerFleet does). Defaults 10000 and 2000;
   * 0 turns replay off.
   */
  replayWindow?: number;
  replayDelay?: number;
  logger?: Logger;
}

export const BRIDGE_DEFAULTS = { prefix: 'tether', qos: 1 as const, maxQueue: 10_000, telemetry: true, replayWindow: 10_000, replayDelay: 2000 };

/**
 * Up lines kept per device for replay. A duplicate ring forgets an id only when
 * the id about 121 ahead of it arrives, so a subscriber's ring still recognises
 * any of the last 96 as a repeat.
 */
const REPLAY_PER_DEVICE = 96;

interface Published {
  payload: string;
  mid: number;
  at: number;
}

export interface BridgeStats {
  /** Device lines published and acknowledged by the broker. */
  published: number;
  /** Device lines handed to the broker and not yet acknowledged (the queue). */
  queued: number;
  /** Device lines refused (no ACK; the device resends) because the queue was full. */
  refused: number;
  /** Lines from the broker for devices of this gateway. */
  downReceived: number;
  /** Of those, ACKed by the device (a receipt was published). */
  downDelivered: number;
  /** Lines from the broker for devices this gateway does not hold (dropped; the app resends). */
  downIgnored: number;
  /** Devices this gateway let go because they showed up at another gateway. */
  handedOver: number;
  /** Times the broker connection came up. */
  brokerConnects: number;
  /** Up lines published again after a broker outage. */
  replayed: number;
}

export interface DeviceStatus {
  state: 'up' | 'down';
  gateway: string;
  at: number;
  reason?: string;
  connects?: number;
  outages?: number;
  messagesIn?: number;
  messagesOut?: number;
}

function readPem(what: string, file: string | undefined): Buffer | undefined {
  if (!file) return undefined;
  try {
    return fs.readFileSync(file);
  } catch (e) {
    throw new TetherError('ERR_BAD_CONFIG', `mqtt.tls.${what}: cannot read ${file} (${(e as NodeJS.ErrnoException).code ?? e}): check the path`);
  }
}

/** Connects a Server's Connections to an MQTT broker. */
export class MqttBridge extends EventEmitter {
  readonly gateway: string;
  readonly prefix: string;
  readonly stats: BridgeStats = { published: 0, queued: 0, refused: 0, downReceived: 0, downDelivered: 0, downIgnored: 0, handedOver: 0, brokerConnects: 0, replayed: 0 };
  /** The last up lines published per device, for replay after a broker outage. */
  private readonly recentUp = new Map<string, Published[]>();
  private brokerLostAt = 0;
  private replayTimer: NodeJS.Timeout | null = null;
  private readonly qos: 1 | 2;
  private readonly maxQueue: number;
  private readonly log: Logger;
  private client: MqttClient | null = null;
  /** Devices whose link this gateway holds or last held, and what to undo when letting go. */
  private readonly owned = new Map<string, () => void>();
  /** When this gateway last took each device's link (its "up" status time). */
  private readonly upSince = new Map<string, number>();
  /** Last status seen on the broker per device (ours and other gateways'). */
  private readonly statuses = new Map<string, DeviceStatus>();
  /** Gateways known online (from their retained gateways/<gw> topic). */
  private readonly gateways = new Map<string, boolean>();
  /** Down message names recently taken per device → delivered yet? */
  private readonly recentDown = new Map<string, Map<string, boolean>>();
  private readonly detach: Array<() => void> = [];
  private closed = false;

  constructor(
    readonly server: Server,
    readonly opts: BridgeOptions,
  ) {
    super();
    if (typeof opts.url !== 'string' || !/^(mqtts?|wss?|tcp|ssl):\/\//.test(opts.url)) {
      throw new TetherError('ERR_BAD_CONFIG', `mqtt.url must be a broker URL like "mqtt://127.0.0.1:1883", got ${JSON.stringify(opts.url)}`);
    }
    this.prefix = opts.prefix ?? BRIDGE_DEFAULTS.prefix;
    if (!this.prefix || /[#+]/.test(this.prefix) || this.prefix.endsWith('/')) {
      throw new TetherError('ERR_BAD_CONFIG', `mqtt.prefix must be a topic level without "#", "+" or a trailing "/", got ${JSON.stringify(this.prefix)}`);
    }
    this.qos = opts.qos ?? BRIDGE_DEFAULTS.qos;
    if (this.qos !== 1 && this.qos !== 2) throw new TetherError('ERR_BAD_CONFIG', `mqtt.qos must be 1 or 2, got ${JSON.stringify(opts.qos)}`);
    this.maxQueue = opts.maxQueue ?? BRIDGE_DEFAULTS.maxQueue;
    this.gateway = opts.gateway ?? `${os.hostname()}-${server.port}`;
    if (/[#+/]/.test(this.gateway)) throw new TetherError('ERR_BAD_CONFIG', `mqtt.gateway must not contain "/", "#" or "+", got ${JSON.stringify(this.gateway)}`);
    this.log = (opts.logger ?? server.log ?? silentLogger).child({ part: 'mqtt', gateway: this.gateway });
  }

  private topic(id: string, leaf: string): string {
    return `${this.prefix}/${id}/${leaf}`;
  }

  /** Whether the broker connection is up now. */
  get connected(): boolean {
    return this.client?.connected ?? false;
  }

  /**
   * Starts bridging: takes over every Connection (present and future) as its
   * reader and connects to the broker. Resolves once the broker connection is
   * up the first time; devices are served meanwhile and their messages wait.
   */
  async start(): Promise<void> {
    const mqtt = loadMqtt();
    const o = this.opts;
    const options: IClientOptions = {
      protocolVersion: 5,
      clientId: `tether-gw-${this.gateway}`,
      clean: true,
      reconnectPeriod: 500,
      connectTimeout: 10_000,
      username: o.username,
      password: o.password,
      ca: readPem('ca', o.tls?.ca),
      cert: readPem('cert', o.tls?.cert),
      key: readPem('key', o.tls?.key),
      will: { topic: `${this.prefix}/gateways/${this.gateway}`, payload: Buffer.from(JSON.stringify({ state: 'offline', at: 0, reason: 'last will' })), qos: 1, retain: true },
    };
    const client = mqtt.connect(o.url, options);
    this.client = client;
    client.on('connect', () => this.onBrokerUp());
    client.on('close', () => {
      if (client.connected === false && this.brokerLostAt === 0 && this.stats.brokerConnects > 0) this.brokerLostAt = Date.now();
      if (!this.closed) throttledWarn(this.log, 'MQTT broker connection lost: device messages wait (not ACKed) until it is back', { url: o.url, queued: this.stats.queued });
    });
    client.on('error', (err) => throttledWarn(this.log, 'MQTT error', { url: o.url, error: err.message, hint: 'check mqtt.url, credentials and that the broker runs' }));
    client.on('message', (topic, payload, packet) => this.onBrokerMessage(topic, payload, packet.properties?.userProperties));

    const onConnection = (c: Connection) => this.adopt(c);
    this.server.on('connection', onConnection);
    this.detach.push(() => this.server.off('connection', onConnection));
    for (const c of this.server.connections()) this.adopt(c);

    await new Promise<void>((resolve) => {
      if (client.connected) return resolve();
      client.once('connect', () => resolve());
    });
  }

  private onBrokerUp(): void {
    this.stats.brokerConnects++;
    const lostAt = this.brokerLostAt;
    this.brokerLostAt = 0;
    const window = this.opts.replayWindow ?? BRIDGE_DEFAULTS.replayWindow;
    if (lostAt > 0 && window > 0) {
      if (this.replayTimer) clearTimeout(this.replayTimer);
      this.replayTimer = setTimeout(() => this.replay(lostAt - window), this.opts.replayDelay ?? BRIDGE_DEFAULTS.replayDelay);
      this.replayTimer.unref();
    }
    this.log.info('MQTT broker connected', { url: this.opts.url });
    const c = this.client!;
    c.publish(`${this.prefix}/gateways/${this.gateway}`, JSON.stringify({ state: 'online', at: Date.now() }), { qos: 1, retain: true });
    c.subscribe([`${this.prefix}/+/status`, `${this.prefix}/gateways/+`], { qos: 1 });
    // After a broker restart without persistence the retained statuses are gone: say again what we hold.
    for (const id of this.owned.keys()) {
      const conn = this.server.get(id);
      if (conn) this.publishStatus(conn, conn.isUp ? 'up' : 'down');
    }
  }

  /** Becomes the reader of `conn`: its lines go to the broker, ACKed once the broker has them. */
  private adopt(conn: Connection): void {
    conn.setConsumer((line, mid) => this.up(conn, line, mid));
    const onUp = () => this.own(conn);
    const onDown = (reason: string) => {
      if (this.owned.has(conn.id)) this.publishStatus(conn, 'down', reason);
    };
    const onTelemetry = (name: string, value: unknown, t: number) => {
      if (this.opts.telemetry === false || !this.client) return;
      this.client.publish(this.topic(conn.id, `telemetry/${name}`), JSON.stringify({ t, v: value }), { qos: 0, retain: true });
    };
    conn.on('up', onUp);
    conn.on('down', onDown);
    conn.on('telemetry', onTelemetry);
    conn.once('close', () => {
      conn.off('up', onUp);
      conn.off('down', onDown);
      conn.off('telemetry', onTelemetry);
      this.letGo(conn.id);
    });
    if (conn.isUp) this.own(conn);
  }

  private up(conn: Connection, line: string, mid: number): Promise<void> | null {
    if (!this.client || this.stats.queued >= this.maxQueue) {
      this.stats.refused++;
      throttledWarn(this.log, 'MQTT queue full: device message refused without ACK (the device resends it)', {
        id: conn.id,
        queued: this.stats.queued,
        maxQueue: this.maxQueue,
        hint: 'the broker is away or slow; raise mqtt.maxQueue if this is a burst',
      });
      return null;
    }
    this.stats.queued++;
    const payload = line.endsWith('\n') ? line.slice(0, -1) : line;
    return new Promise((resolve, reject) => {
      this.client!.publish(
        this.topic(conn.id, 'up'),
        payload,
        { qos: this.qos, properties: { userProperties: { mid: String(mid), gw: this.gateway } } },
        (err) => {
          this.stats.queued--;
          if (err) return reject(err);
          this.stats.published++;
          let recent = this.recentUp.get(conn.id);
          if (!recent) this.recentUp.set(conn.id, (recent = []));
          recent.push({ payload, mid, at: Date.now() });
          if (recent.length > REPLAY_PER_DEVICE) recent.shift();
          resolve();
        },
      );
    });
  }

  /** Publishes again the up lines published since `since` (see replayWindow). */
  private replay(since: number): void {
    this.replayTimer = null;
    const c = this.client;
    if (!c || this.closed) return;
    let n = 0;
    for (const [id, recent] of this.recentUp) {
      for (const p of recent) {
        if (p.at < since) continue;
        n++;
        c.publish(this.topic(id, 'up'), p.payload, { qos: this.qos, properties: { userProperties: { mid: String(p.mid), gw: this.gateway, replay: '1' } } });
      }
    }
    this.stats.replayed += n;
    if (n > 0) this.log.info('broker back: recent up lines published again (subscribers drop the ones they had)', { lines: n });
  }

  /** This gateway now holds `conn`'s link: take its down topic and say so. */
  private own(conn: Connection): void {
    const id = conn.id;
    if (!this.owned.has(id)) {
      const topic = this.topic(id, 'down');
      this.client?.subscribe(topic, { qos: this.qos });
      this.owned.set(id, () => this.client?.unsubscribe(topic));
    }
    this.upSince.set(id, Date.now());
    this.publishStatus(conn, 'up');
  }

  /** Stops serving `id` here: unsubscribes its down topic. */
  private letGo(id: string): void {
    const undo = this.owned.get(id);
    if (!undo) return;
    this.owned.delete(id);
    this.upSince.delete(id);
    this.recentDown.delete(id);
    this.recentUp.delete(id);
    undo();
  }

  private publishStatus(conn: Connection, state: 'up' | 'down', reason?: string): void {
    const s: DeviceStatus = {
      state,
      gateway: this.gateway,
      at: Date.now(),
      reason,
      connects: conn.counters.connects,
      outages: conn.counters.outages,
      messagesIn: conn.counters.messagesIn,
      messagesOut: conn.counters.messagesOut,
    };
    this.statuses.set(conn.id, s);
    this.client?.publish(this.topic(conn.id, 'status'), JSON.stringify(s), { qos: 1, retain: true });
  }

  private onBrokerMessage(topic: string, payload: Buffer, props: Record<string, string | string[]> | undefined): void {
    if (!topic.startsWith(this.prefix + '/')) return;
    const rest = topic.slice(this.prefix.length + 1);
    if (rest.startsWith('gateways/')) return this.onGateway(rest.slice(9), payload);
    const slash = rest.lastIndexOf('/');
    const id = rest.slice(0, slash);
    const leaf = rest.slice(slash + 1);
    if (leaf === 'status') return this.onStatus(id, payload);
    if (leaf === 'down') return this.onDown(id, payload, props);
  }

  private onGateway(name: string, payload: Buffer): void {
    let state: unknown;
    try {
      state = JSON.parse(payload.toString()).state;
    } catch {
      return;
    }
    const online = state === 'online';
    this.gateways.set(name, online);
    if (online || name === this.gateway) return;
    // A gateway died: the first online gateway by name marks its devices down (the others would repeat it).
    const first = [...this.gateways].filter(([, on]) => on).map(([n]) => n).sort()[0];
    if (first !== this.gateway) return;
    for (const [id, s] of this.statuses) {
      if (s.gateway !== name || s.state !== 'up' || this.owned.has(id)) continue;
      const down: DeviceStatus = { ...s, state: 'down', at: Date.now(), reason: `gateway ${name} went offline` };
      this.statuses.set(id, down);
      this.client?.publish(this.topic(id, 'status'), JSON.stringify(down), { qos: 1, retain: true });
    }
  }

  private onStatus(id: string, payload: Buffer): void {
    let s: DeviceStatus;
    try {
      s = JSON.parse(payload.toString());
    } catch {
      return;
    }
    if (!s || typeof s.gateway !== 'string') return;
    this.statuses.set(id, s);
    if (s.gateway === this.gateway || !this.owned.has(id)) return;
    const conn = this.server.get(id);
    // Another gateway's "up" that is older than our own link is stale (a retained
    // status, or a late message): we hold the device, so ours must stand.
    const stale = s.state !== 'up' || s.at < (this.upSince.get(id) ?? 0);
    if (conn?.isUp && stale) {
      this.publishStatus(conn, 'up');
      return;
    }
    if (s.state === 'up' && !stale) {
      // The device is at another gateway now: let go, so its down lines go there only.
      this.stats.handedOver++;
      this.log.info('device moved to another gateway: letting go of it here', { id, to: s.gateway });
      this.letGo(id);
      conn?.close(); // queued down lines are dropped here; the app resends them through the new owner
    }
  }

  private onDown(id: string, payload: Buffer, props: Record<string, string | string[]> | undefined): void {
    const conn = this.server.get(id);
    if (!conn || !this.owned.has(id)) {
      this.stats.downIgnored++;
      return;
    }
    this.stats.downReceived++;
    const raw = props?.msg;
    const name = Array.isArray(raw) ? raw[0] : raw;
    let recent = this.recentDown.get(id);
    if (name !== undefined) {
      if (!recent) this.recentDown.set(id, (recent = new Map()));
      const seen = recent.get(name);
      if (seen !== undefined) {
        // A resend of a line already taken: never write it twice; confirm it again if it was delivered.
        if (seen) this.receipt(id, name);
        return;
      }
      recent.set(name, false);
      if (recent.size > 1024) recent.delete(recent.keys().next().value!);
    }
    const line = payload.toString('utf8');
    conn.write(line).then(
      () => {
        this.stats.downDelivered++;
        if (name !== undefined) {
          recent?.set(name, true);
          this.receipt(id, name);
        }
      },
      (err: Error) => {
        if (name !== undefined) recent?.delete(name);
        this.log.debug('down line not delivered', { id, error: err.message });
      },
    );
  }

  private receipt(id: string, name: string): void {
    this.client?.publish(this.topic(id, 'receipt'), name, { qos: this.qos });
  }

  /** Stops bridging: marks this gateway offline, disconnects from the broker. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.replayTimer) clearTimeout(this.replayTimer);
    for (const d of this.detach) d();
    const c = this.client;
    if (!c) return;
    if (c.connected) {
      await c.publishAsync(`${this.prefix}/gateways/${this.gateway}`, JSON.stringify({ state: 'offline', at: Date.now(), reason: 'closed' }), { qos: 1, retain: true }).catch(() => {});
    }
    await c.endAsync();
  }
}
