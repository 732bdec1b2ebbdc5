export { PtyPair } from '../../src/ptypair';
