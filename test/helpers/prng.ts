/** The seeded PRNG lives in src/util.ts now (the chaos proxy uses it too). */
export { prng } from '../../src/util';
