/**
 * Abuse under load, the short version of `npm run abuse` (bench/abuse.ts): 100
 * good clients exchanging qos messages with an echo app, first alone, then while
 * 200 hostile connections (slowloris ID lines, 10 MB lines, random binary, rapid
 * connect/close, ID hijack attempts) hammer the same server from other loopback
 * addresses, in their own process. Correctness only: nothing lost, duplicated or
 * reordered for any good client, no hijack, every kind of attack met its limit,
 * memory bounded, the server still takes a fresh client. The speed goal (ACK p99
 * within 5× of the quiet run) is the benchmark's; here it is only logged.
 */
import test from 'ava';
import { AbuseReport, formatReport, runAbuse } from '../bench/abuse';

test('abuse under load: good clients lose nothing, no hijack succeeds, every attack hits its limit, memory stays bounded', async (t) => {
  const t0 = Date.now();
  const r: AbuseReport = await runAbuse({ good: 100, hostile: 200, duration: 4, downClients: 3, downFor: 1500, seed: 8 });
  t.log(formatReport(r));
  t.log(`ACK p99 quiet ${r.quiet.ackRtt.p99.toFixed(2)} ms, attack ${r.attack.ackRtt.p99.toFixed(2)} ms: ratio ${r.p99Ratio.toFixed(2)} (not asserted here)`);
  t.log(`run time ${((Date.now() - t0) / 1000).toFixed(1)} s`);

  // Lose nothing: every good client got exactly its own messages back, once each, in order, in both phases.
  for (const p of [r.quiet, r.attack]) {
    t.true(p.sent >= 100 * 3, `${p.name}: the good clients kept sending (${p.sent} messages)`);
    t.is(p.received, p.sent, `${p.name}: every message echoed`);
    t.is(p.clientsWrong, 0, `${p.name}: ${p.examples.join(' | ')}`);
    t.is(p.lost, 0);
    t.is(p.duplicated, 0);
    t.is(p.reordered, 0);
    t.is(p.foreign, 0, `${p.name}: no client got another's line`);
    t.is(p.writeErrors, 0);
    t.is(p.stuckWrites, 0);
    t.is(p.ackRtt.samples, p.sent, `${p.name}: every write resolved with its ACK`);
  }
  t.is(r.attack.forcedDowns, 3, 'the deliberately downed clients went down (and came back: their echoes are all in)');

  // No hijack: attempts were made, while the targets were up and while they were down, and got nothing.
  t.true(r.hostile.hijack.attempts > 0, 'hijack attempts were made');
  t.true(r.hostile.hijack.whileDown > 0, 'some while their target was deliberately down');
  t.is(r.hijacks, 0, `no good ID attached from a hostile address: ${JSON.stringify(r.attack.server.hijacks.slice(0, 3))}`);
  t.is(r.hijackBytes, 0, `hijackers received nothing: ${JSON.stringify(r.hostile.hijack.received)}`);
  t.is(r.hostile.hijack.stayedOpen, 0, 'the server closed every hijack attempt');

  // Every kind of attack ran and met its limit.
  for (const k of ['slowloris', 'bigline', 'binary', 'rapid', 'hijack'] as const) {
    t.true(r.hostile.kinds[k].opened > 0, `${k} connections were opened`);
  }
  const lim = r.limitsDuringAttack;
  const hs = r.handshakesDuringAttack;
  t.true((lim.idTimeout ?? 0) > 0, 'slowloris ID lines were closed by idTimeout');
  t.true((lim.maxIdLength ?? 0) > 0, '10 MB without an ID line (and binary) hit maxIdLength');
  t.true(r.linesDuringAttack.longLines > 0, '10 MB lines after an ID were dropped at maxLineLength');
  t.true(r.linesDuringAttack.badLines > 0, 'random binary after an ID was dropped as bad lines');
  t.true((hs.badId ?? 0) > 0, 'random binary as an ID line was refused');
  t.true((hs.closedEarly ?? 0) > 0, 'rapid connect/close was seen closing before its ID line');
  t.true((lim.authFailed ?? 0) + (lim.addressBlocked ?? 0) > 0, 'hijack attempts failed authentication or were blocked');
  t.true((hs.authFailed ?? 0) > 0, 'some hijack attempts reached the secret check and failed it');

  // Memory bounded; the server alive and still taking a fresh good client.
  t.true(r.rssGrowthMB < 300, `peak RSS grew ${r.rssGrowthMB.toFixed(0)} MB under attack`);
  t.is(r.serverCrash, null);
  t.true(r.fresh.ok, `a fresh good client connected and got its echo after the attack (${r.fresh.error ?? ''})`);
  t.is(r.final.pendingHandshakes, 0, 'no handshake left hanging after the attack');
  t.true(r.final.openConnections <= 100, `only good clients are still connected (${r.final.openConnections} sockets open)`);
});
