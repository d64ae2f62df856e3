// fusedopt._C.StateSnapshot: tells an optimizer, once per step, whether its state was written since the last step.
//
// The optimizers cache their state tensors in buckets. A user who replaces an entry between steps
// (`opt.state[p]["exp_avg"] = t`, `opt.state[p] = {...}`) keeps every size the same, so only a look at every entry
// sees it. In Python that costs ~100 ns per entry (a Tensor's __hash__ is Python code); here it is a walk with
// PyDict_Next and pointer compares, a few ns per entry, and no Python code runs (so nothing can change the dicts
// mid-walk).
#include <pybind11/pybind11.h>

#include <cstddef>
#include <vector>

namespace fusedopt::cpu {
namespace {

namespace py = pybind11;

// The record: the mapping, then for each of its items the key and the value and, where the value is a dict (a
// param's state), that dict's keys and values; every dict's items end with an empty handle, so two layouts cannot
// read alike. The record holds references: an object it names cannot be freed, so its address cannot come back
// as a new object's (a replaced tensor freed and a new one made at the same address would otherwise look unchanged).
class StateSnapshot {
 public:
  // True when the live mapping differs from the record in anything (identity, a key, a value, a size, the order);
  // the record then becomes the live state. The first call after construction records and returns true.
  bool refresh(py::handle mapping) {
    if (recorded_ && walk(mapping, /*compare=*/true)) return false;
    record_.clear();
    walk(mapping, /*compare=*/false);
    recorded_ = true;
    return true;
  }

 private:
  // Records `mapping` (compare=false) or compares it with the record (compare=true: false at the first difference).
  bool walk(py::handle mapping, bool compare) {
    std::size_t at = 0;
    auto visit = [&](PyObject* obj) {
      if (!compare) {
        record_.push_back(py::reinterpret_borrow<py::object>(obj));
        return true;
      }
      return at < record_.size() && record_[at++].ptr() == obj;
    };
    // nested: the mapping's level, whose dict values (the params' states) are walked one level down
    auto visit_items = [&](auto& self, PyObject* dict, bool nested) -> bool {
      Py_ssize_t pos = 0;
      PyObject *key, *value;
      while (PyDict_Next(dict, &pos, &key, &value)) {
        if (!visit(key) || !visit(value)) return false;
        if (nested && PyDict_Check(value) && !self(self, value, false)) return false;
      }
      return visit(nullptr);
    };
    if (!visit(mapping.ptr())) return false;
    // not a dict: only its identity is watched (torch.optim's state is a defaultdict)
    if (PyDict_Check(mapping.ptr()) && !visit_items(visit_items, mapping.ptr(), true)) return false;
    return !compare || at == record_.size();
  }

  std::vector<py::object> record_;
  bool recorded_ = false;
};

}  // namespace

void bind_state_snapshot(py::module_& m) {
  py::class_<StateSnapshot>(m, "StateSnapshot",
                            "A record of an optimizer's state mapping and every entry of each param's state dict")
      .def(py::init<>())
      .def("refresh", &StateSnapshot::refresh, py::arg("mapping"),
           "True when the mapping or any param's state entry changed since the last call (or this is the first); "
           "the record then follows the live state");
}

}  // namespace fusedopt::cpu
