/**
 * Error messages that say what is wrong and where (issue 14, item 18).
 */
import test from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Server, silentLogger } from '../src';
import { resolveConfig } from '../src/config';
import { makePki, Pki } from './helpers/certs';

let pki: Pki;
test.before(() => {
  pki = makePki();
});
test.after.always(() => pki?.remove());

test('a number JSON cannot hold is shown as what it is, not "null"', (t) => {
  t.throws(() => resolveConfig(JSON.parse('{ "timeout": 1e400 }')), { message: /"timeout" must be an integer from 40 to 3600000, got Infinity/ });
});

test('a damaged or wrong PEM file is named in the error, with what it should hold', async (t) => {
  const junk = path.join(pki.dir, 'junk.pem');
  fs.writeFileSync(junk, '-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n');
  await t.throwsAsync(Server.listen({ host: '127.0.0.1', port: 0, logger: silentLogger, tls: { key: junk, cert: pki.serverCert } }), {
    message: new RegExp(`tls\\.key: ${junk.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')} is not a PEM private key`),
  });
  await t.throwsAsync(Server.listen({ host: '127.0.0.1', port: 0, logger: silentLogger, tls: { key: pki.serverKey, cert: pki.serverKey } }), {
    message: /tls\.cert: .* is not a PEM certificate/,
  });
});
