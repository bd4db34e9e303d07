export { spawnWorker, Worker } from "./worker";
export type { SpawnOptions, RequestOptions, GenerateOptions, CloseOptions, CloseResult, ExitInfo, CallbackSource } from "./worker";
export { Generation, type GenerateEvent, type LoadEvent, type RequestEvent, type EventOf } from "./generation";
export { ChannelText, channelOf, type Channel } from "./channels";
export { RpcError, WorkerExitedError, ProtocolError } from "./errors";
export { LineSplitter } from "./lines";
export { checkIntegerParams } from "./params";
export * from "./generated/protocol";
