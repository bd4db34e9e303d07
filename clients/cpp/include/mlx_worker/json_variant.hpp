// nlohmann::json support for the std::variant unions of the generated protocol types.
//
// Writing serializes the active alternative. Reading picks the first alternative that
// fits the JSON value: by JSON type (string, number, boolean, array, object), and for
// tagged structs (those with kTagField/kTag) by the tag's value.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

namespace mlx_worker::detail {

template <class T, class = void>
struct has_tag : std::false_type {};
template <class T>
struct has_tag<T, std::void_t<decltype(T::kTag), decltype(T::kTagField)>> : std::true_type {};

template <class T>
struct is_vector : std::false_type {};
template <class T, class A>
struct is_vector<std::vector<T, A>> : std::true_type {};

template <class T>
bool fits(const nlohmann::json& j) {
  if constexpr (std::is_same_v<T, nlohmann::json>) {
    return true;
  } else if constexpr (std::is_same_v<T, std::string>) {
    return j.is_string();
  } else if constexpr (std::is_same_v<T, bool>) {
    return j.is_boolean();
  } else if constexpr (std::is_integral_v<T>) {
    return j.is_number_integer();
  } else if constexpr (std::is_floating_point_v<T>) {
    return j.is_number();
  } else if constexpr (is_vector<T>::value) {
    return j.is_array();
  } else if constexpr (has_tag<T>::value) {
    if (!j.is_object()) return false;
    auto it = j.find(T::kTagField);
    return it != j.end() && it->is_string() && it->template get_ref<const std::string&>() == T::kTag;
  } else {
    return j.is_object();
  }
}

template <class Variant, std::size_t I = 0>
void variant_from_json(const nlohmann::json& j, Variant& v) {
  if constexpr (I == std::variant_size_v<Variant>) {
    throw nlohmann::json::type_error::create(302, "value matches no alternative of the union: " + j.dump(),
                                             &j);
  } else {
    using T = std::variant_alternative_t<I, Variant>;
    if (fits<T>(j)) {
      v = j.template get<T>();
    } else {
      variant_from_json<Variant, I + 1>(j, v);
    }
  }
}

}  // namespace mlx_worker::detail

namespace nlohmann {

template <class... Ts>
struct adl_serializer<std::variant<Ts...>> {
  static void to_json(json& j, const std::variant<Ts...>& v) {
    std::visit([&j](const auto& alt) { j = alt; }, v);
  }
  static void from_json(const json& j, std::variant<Ts...>& v) {
    mlx_worker::detail::variant_from_json(j, v);
  }
};

}  // namespace nlohmann
