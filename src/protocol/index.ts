export * from './lines';
export * from './ids';
