/**
 * The app side of the MQTT bridge: talk to devices through the broker alone,
 * from any process, with the same guarantees as a local app.
 *
 * - `message` events carry each device line once: repeats (an MQTT QoS 1
 *   redelivery, or a message a device resent to a new gateway after the old one
 *   died) are recognised by the device's own message id, with the same
 *   duplicate filter the gateways use on the wire.
 * - `send()` resolves when the device ACKed the line (the gateway's receipt);
 *   it resends when the device shows up at another gateway and after
 *   `resendAfter` without a receipt, and gateways never write one named line
 *   twice.
 */
import { EventEmitter } from 'node:events';
import type { IClientOptions, MqttClient } from 'mqtt';
import { loadMqtt } from './mqtt-load';
import { nanoid } from 'nanoid';
import { TetherError } from './errors';
import { silentLogger } from './log';
import type { Logger } from './log';
import { ReceiveFilter } from './protocol/ids';
import type { DeviceStatus } from './bridge';

export interface BrokerFleetOptions {
  url: string;
  username?: string;
  password?: string;
  /** First topic level, as the gateways' `mqtt.prefix`. Default `tether`. */
  prefix?: string;
  /** QoS of the down lines. Default 1. */
  qos?: 1 | 2;
  /**
   * MQTT client id. Give a fixed one to keep a persistent session: the broker
   * then queues device lines while the app is away (and across a restart of a
   * broker with persistence). Default: a random one, no persistent session.
   */
  clientId?: string;
  /** ms without a receipt before `send()` publishes the line again. Default 5000. */
  resendAfter?: number;
  logger?: Logger;
}

interface Outgoing {
  id: string;
  line: string;
  name: string;
  resolve(): void;
  reject(e: Error): void;
  timer: NodeJS.Timeout;
  deadline: NodeJS.Timeout | null;
}

/** Devices as seen through the broker. Events: `message` (id, line), `status` (id, DeviceStatus). */
export class BrokerFleet extends EventEmitter {
  readonly prefix: string;
  /** Repeats dropped by the duplicate filter. */
  duplicatesDropped = 0;
  private readonly client: MqttClient;
  private readonly qos: 1 | 2;
  private readonly resendAfter: number;
  private readonly filters = new Map<string, ReceiveFilter>();
  private readonly statuses = new Map<string, DeviceStatus>();
  private readonly gateways = new Map<string, boolean>();
  private readonly outgoing = new Map<string, Outgoing>();
  private readonly log: Logger;

  private constructor(client: MqttClient, opts: BrokerFleetOptions) {
    super();
    this.client = client;
    this.prefix = opts.prefix ?? 'tether';
    this.qos = opts.qos ?? 1;
    this.resendAfter = opts.resendAfter ?? 5000;
    this.log = (opts.logger ?? silentLogger).child({ part: 'broker-fleet' });
    client.on('message', (topic, payload, packet) => this.onMessage(topic, payload, packet.properties?.userProperties));
  }

  /** Connects and subscribes; resolves once the broker has confirmed the subscriptions. */
  static async connect(opts: BrokerFleetOptions): Promise<BrokerFleet> {
    const mqtt = loadMqtt();
    const persistent = opts.clientId !== undefined;
    const options: IClientOptions = {
      protocolVersion: 5,
      clientId: opts.clientId ?? `tether-app-${nanoid(8)}`,
      clean: !persistent,
      properties: persistent ? { sessionExpiryInterval: 3600 } : undefined,
      reconnectPeriod: 500,
      username: opts.username,
      password: opts.password,
    };
    const client = await mqtt.connectAsync(opts.url, options);
    const fleet = new BrokerFleet(client, opts);
    const p = fleet.prefix;
    await client.subscribeAsync([`${p}/+/up`, `${p}/+/status`, `${p}/+/receipt`, `${p}/gateways/+`], { qos: fleet.qos });
    client.on('connect', () => fleet.onReconnect());
    return fleet;
  }

  /** The device's last status; `state` is "down" if its gateway is offline. */
  status(id: string): DeviceStatus | undefined {
    const s = this.statuses.get(id);
    if (!s) return undefined;
    return s.state === 'up' && this.gateways.get(s.gateway) === false ? { ...s, state: 'down', reason: `gateway ${s.gateway} is offline` } : s;
  }

  /** IDs of every device seen on the broker. */
  devices(): string[] {
    return [...this.statuses.keys()];
  }

  /**
   * Sends a line to a device with qos; resolves when the device has ACKed it.
   * Rejects after `timeout` ms (default: never) or on close().
   */
  send(id: string, line: string, opts: { timeout?: number } = {}): Promise<void> {
    if (!line || line.includes('\n')) return Promise.reject(new TetherError('ERR_NEWLINE_IN_PAYLOAD', 'send one non-empty line without "\\n" inside'));
    const name = nanoid(12);
    return new Promise<void>((resolve, reject) => {
      const o: Outgoing = {
        id,
        line,
        name,
        resolve,
        reject,
        timer: setInterval(() => this.publish(o), this.resendAfter),
        deadline: opts.timeout
          ? setTimeout(() => this.settle(o, new TetherError('ERR_ABORTED', `no receipt from ${id} within ${opts.timeout} ms: is the device up?`)), opts.timeout)
          : null,
      };
      this.outgoing.set(name, o);
      this.publish(o);
    });
  }

  private publish(o: Outgoing): void {
    this.client.publish(`${this.prefix}/${o.id}/down`, o.line, { qos: this.qos, properties: { userProperties: { msg: o.name } } });
  }

  private settle(o: Outgoing, err?: Error): void {
    if (!this.outgoing.delete(o.name)) return;
    clearInterval(o.timer);
    if (o.deadline) clearTimeout(o.deadline);
    if (err) o.reject(err);
    else o.resolve();
  }

  private onReconnect(): void {
    // Anything in flight may have been lost with the old connection's subscriptions.
    for (const o of this.outgoing.values()) this.publish(o);
  }

  private onMessage(topic: string, payload: Buffer, props: Record<string, string | string[]> | undefined): void {
    if (!topic.startsWith(this.prefix + '/')) return;
    const rest = topic.slice(this.prefix.length + 1);
    if (rest.startsWith('gateways/')) {
      try {
        this.gateways.set(rest.slice(9), JSON.parse(payload.toString()).state === 'online');
      } catch {
        /* not ours */
      }
      return;
    }
    const slash = rest.lastIndexOf('/');
    const id = rest.slice(0, slash);
    const leaf = rest.slice(slash + 1);
    if (leaf === 'up') {
      const line = payload.toString('utf8');
      const raw = props?.mid;
      const mid = Number(Array.isArray(raw) ? raw[0] : raw);
      if (Number.isInteger(mid) && mid >= 0 && mid <= 255) {
        let f = this.filters.get(id);
        if (!f) this.filters.set(id, (f = new ReceiveFilter()));
        const replay = props?.replay === '1' || (Array.isArray(props?.replay) && props!.replay[0] === '1');
        if (!(replay ? f.acceptReplay(mid, line) : f.accept(mid, line))) {
          this.duplicatesDropped++;
          return;
        }
      }
      this.emit('message', id, line);
    } else if (leaf === 'receipt') {
      const o = this.outgoing.get(payload.toString());
      if (o) this.settle(o);
    } else if (leaf === 'status') {
      let s: DeviceStatus;
      try {
        s = JSON.parse(payload.toString());
      } catch {
        return;
      }
      const before = this.statuses.get(id);
      this.statuses.set(id, s);
      // The device is up somewhere new: what we sent may be stranded at its old gateway.
      if (s.state === 'up' && (before?.gateway !== s.gateway || before?.state !== 'up')) {
        for (const o of this.outgoing.values()) if (o.id === id) this.publish(o);
      }
      this.emit('status', id, this.status(id));
    }
  }

  /** Rejects pending sends and disconnects. */
  async close(): Promise<void> {
    for (const o of [...this.outgoing.values()]) this.settle(o, new TetherError('ERR_CLOSED', 'the BrokerFleet is closed'));
    await this.client.endAsync();
  }
}
