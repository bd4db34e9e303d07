// Issue 15's channels on `token` events: which part of the output a token belongs to
// (answer, reasoning, a tool call's body, or a marker), and their text added up per
// channel as a generation streams.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <vector>

#include "mlx_worker/protocol.hpp"

namespace mlx_worker {

namespace channel {
inline constexpr const char* content = "content";
inline constexpr const char* reasoning = "reasoning";
inline constexpr const char* tool_call = "tool_call";
inline constexpr const char* marker = "marker";
}  // namespace channel

namespace detail {
// The worker leaves `channel` out for "content"; these read the field whether the
// generated type carries it as optional or as required.
inline std::string channel_name(const std::optional<std::string>& c) { return c.value_or(channel::content); }
inline std::string channel_name(const std::string& c) { return c.empty() ? channel::content : c; }
}  // namespace detail

// The event's channel: "content", "reasoning", "tool_call" or "marker".
inline std::string channel_of(const TokenEvent& event) { return detail::channel_name(event.channel); }

// Per-channel text of one generation, fed with its token events. At the end `content` and
// `reasoning` equal the result's fields, and tool_calls[i] is the text of call i as the
// model wrote it (the result's tool_calls hold the parsed calls).
struct ChannelText {
  std::string content;
  std::string reasoning;
  std::vector<std::string> tool_calls;

  void add(const TokenEvent& event) {
    const std::string ch = channel_of(event);
    if (ch == channel::content) {
      content += event.text;
    } else if (ch == channel::reasoning) {
      reasoning += event.text;
    } else if (ch == channel::tool_call) {
      auto index = static_cast<std::size_t>(event.tool_call_index.value_or(0));
      if (tool_calls.size() <= index) tool_calls.resize(index + 1);
      tool_calls[index] += event.text;
    }  // markers (<think>, <tool_call>, ...) belong to no channel's text
  }
};

}  // namespace mlx_worker
