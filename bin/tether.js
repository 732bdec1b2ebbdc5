#!/usr/bin/env node
'use strict';
// Runs the TypeScript sources directly (transpile only; `npm test` type-checks).
const path = require('node:path');
require('ts-node').register({ transpileOnly: true, project: path.join(__dirname, '..', 'tsconfig.json') });
require('../src/cli')
  .main(process.argv.slice(2))
  .then((code) => process.exit(code));
