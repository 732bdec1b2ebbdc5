/**
 * Child process for `npm run bench:bridge -- --split`: either a gateway
 * (`gateway direct|bridged <brokerUrl>`: a Server; direct = a local app counts
 * the lines, bridged = an MqttBridge sends them to the broker) or an app
 * (`app <brokerUrl> <qos>`: a BrokerFleet counting lines). Reports over IPC.
 */
import { BrokerFleet, Connection, MqttBridge, Server, silentLogger } from '../src';

const [role, mode, url, qos] = process.argv.slice(2);
const send = (m: object) => process.send!(m);

void (async () => {
  let count = 0;
  if (role === 'gateway') {
    const server = await Server.listen({ host: '127.0.0.1', port: 0, logger: silentLogger });
    if (mode === 'bridged') {
      const bridge = new MqttBridge(server, { url, gateway: 'bench', qos: Number(qos ?? 1) as 1 | 2, logger: silentLogger });
      await bridge.start();
    } else {
      server.on('connection', (c: Connection) => void (async () => { for await (const _ of c) count++; })());
    }
    send({ type: 'ready', port: server.port });
  } else {
    const fleet = await BrokerFleet.connect({ url: mode, qos: Number(url ?? 1) as 1 | 2 });
    fleet.on('message', () => count++);
    send({ type: 'ready' });
  }
  process.on('message', (m: { type: string }) => {
    if (m.type === 'count') send({ type: 'count', count });
    if (m.type === 'exit') process.exit(0);
  });
})();
