/**
 * An app that runs in its own process and reaches devices only through the MQTT
 * broker, whichever gateway holds them: it answers every device line with
 * "echo:<line>" (qos, with a receipt) and prints one JSON line per event.
 *
 *   node -r ts-node/register/transpile-only examples/broker-app.ts --url mqtt://127.0.0.1:1883 [--prefix tether] [--client-id echo-app]
 *
 * With --client-id the broker keeps a persistent session for it: lines that
 * devices send while the app is away (or the broker restarts, with persistence
 * on) are delivered when it is back.
 */
import { parseArgs } from 'node:util';
import { BrokerFleet, createLogger } from '../src';

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: { url: { type: 'string' }, prefix: { type: 'string' }, 'client-id': { type: 'string' }, 'resend-after': { type: 'string' } },
  });
  if (!values.url) throw new Error('give the broker: --url mqtt://127.0.0.1:1883');
  const out = (o: object) => process.stdout.write(JSON.stringify({ t: Date.now(), ...o }) + '\n');
  const fleet = await BrokerFleet.connect({
    url: values.url,
    prefix: values.prefix,
    clientId: values['client-id'],
    resendAfter: values['resend-after'] ? Number(values['resend-after']) : undefined,
    logger: createLogger({ level: 'warn', format: 'json' }),
  });
  out({ event: 'ready' });
  fleet.on('message', (id: string, line: string) => {
    out({ event: 'message', id, line });
    fleet.send(id, `echo:${line}`).then(
      () => out({ event: 'delivered', id, line: `echo:${line}` }),
      (e: Error) => out({ event: 'failed', id, line: `echo:${line}`, error: e.message }),
    );
  });
  fleet.on('status', (id: string, s: { state: string; gateway: string }) => out({ event: 'status', id, state: s.state, gateway: s.gateway }));
  const stop = async () => {
    out({ event: 'stopping', duplicatesDropped: fleet.duplicatesDropped });
    await fleet.close();
    process.exit(0);
  };
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
}

main().catch((e) => {
  process.stderr.write(`broker-app: ${(e as Error).message}\n`);
  process.exit(1);
});
