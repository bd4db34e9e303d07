import { INTEGER_PARAMS, type MethodName } from "./generated/protocol";

/**
 * Refuses integers JSON can't carry exactly in JavaScript (a seed above 2^53
 * would silently become another seed) before anything is sent.
 */
export function checkIntegerParams(method: MethodName, params: unknown): void {
  if (!params || typeof params !== "object") return;
  const obj = params as Record<string, unknown>;
  for (const spec of INTEGER_PARAMS[method] ?? []) {
    const isArray = spec.endsWith("[]");
    const name = isArray ? spec.slice(0, -2) : spec;
    const value = obj[name];
    if (isArray && Array.isArray(value)) value.forEach((v, i) => checkInteger(`params.${name}[${i}]`, v));
    else if (!isArray) checkInteger(`params.${name}`, value);
  }
}

function checkInteger(field: string, value: unknown): void {
  if (typeof value === "bigint") {
    throw new RangeError(`${field}: a bigint can't be sent as a JSON number; use a safe integer (|n| ≤ 2^53 - 1)`);
  }
  if (typeof value === "number" && !Number.isSafeInteger(value)) {
    throw new RangeError(
      `${field}: ${value} is not a safe integer (|n| ≤ 2^53 - 1); larger numbers lose precision in JavaScript, so it is refused before sending`,
    );
  }
}
