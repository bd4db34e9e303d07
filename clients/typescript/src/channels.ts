// Issue 15's channels on `token` events: which part of the output a token
// belongs to (answer, reasoning, a tool call's body, or a marker), and their
// text added up per channel as a generation streams.
import type { TokenEvent } from "./generated/protocol";
import type { GenerateEvent } from "./generation";

export type Channel = NonNullable<TokenEvent["channel"]>;

/** The event's channel. The worker leaves `channel` out for `"content"`. */
export function channelOf(event: TokenEvent): Channel {
  return event.channel ?? "content";
}

/**
 * Per-channel text of one generation: feed it the generation's events
 * (`onEvent: (e) => texts.add(e)`). At the end `content` and `reasoning`
 * equal the result's fields, and `toolCalls[i]` is the text of call i as the
 * model wrote it (the result's `tool_calls` hold the parsed calls). Markers
 * (`<think>`, `<tool_call>`, …) belong to no channel's text.
 */
export class ChannelText {
  content = "";
  reasoning = "";
  toolCalls: string[] = [];

  add(event: GenerateEvent | TokenEvent): void {
    if ("type" in event && event.type !== "token") return;
    const token = event as TokenEvent;
    switch (channelOf(token)) {
      case "content":
        this.content += token.text;
        break;
      case "reasoning":
        this.reasoning += token.text;
        break;
      case "tool_call": {
        const index = token.tool_call_index ?? 0;
        while (this.toolCalls.length <= index) this.toolCalls.push("");
        this.toolCalls[index] += token.text;
        break;
      }
    }
  }
}
