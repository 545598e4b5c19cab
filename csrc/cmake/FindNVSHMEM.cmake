# Finds NVSHMEM: NVSHMEM_HOME (CMake variable or environment) first, else the nvidia-nvshmem-cu13 pip wheel
# of the python3 on PATH. The wheel ships libnvshmem_host.so.3 without the libnvshmem_host.so development
# symlink, so the versioned file name is searched too and no symlink has to be made by hand.
#
# Defines NVSHMEM::host (shared), NVSHMEM::device (static device library), NVSHMEM_INCLUDE_DIR, NVSHMEM_LIB_DIR.

set(_nvshmem_hints "")
if(NVSHMEM_HOME)
  list(APPEND _nvshmem_hints "${NVSHMEM_HOME}")
elseif(DEFINED ENV{NVSHMEM_HOME})
  list(APPEND _nvshmem_hints "$ENV{NVSHMEM_HOME}")
endif()
find_package(Python3 COMPONENTS Interpreter QUIET)
if(Python3_Interpreter_FOUND)
  execute_process(
    COMMAND ${Python3_EXECUTABLE} -c "import nvidia.nvshmem as m; print(list(m.__path__)[0])"
    OUTPUT_VARIABLE _nvshmem_wheel OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _nvshmem_rc)
  if(_nvshmem_rc EQUAL 0 AND _nvshmem_wheel)
    list(APPEND _nvshmem_hints "${_nvshmem_wheel}")
  endif()
endif()

find_path(NVSHMEM_INCLUDE_DIR nvshmem.h HINTS ${_nvshmem_hints} PATH_SUFFIXES include)
find_library(NVSHMEM_HOST_LIBRARY NAMES nvshmem_host libnvshmem_host.so.3 HINTS ${_nvshmem_hints} PATH_SUFFIXES lib lib64)
find_library(NVSHMEM_DEVICE_LIBRARY NAMES nvshmem_device libnvshmem_device.a HINTS ${_nvshmem_hints} PATH_SUFFIXES lib lib64)

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(NVSHMEM
  REQUIRED_VARS NVSHMEM_INCLUDE_DIR NVSHMEM_HOST_LIBRARY NVSHMEM_DEVICE_LIBRARY
  REASON_FAILURE_MESSAGE "set NVSHMEM_HOME or run: pip install nvidia-nvshmem-cu13==3.4.5")

if(NVSHMEM_FOUND)
  get_filename_component(NVSHMEM_LIB_DIR "${NVSHMEM_HOST_LIBRARY}" DIRECTORY)
  if(NOT TARGET NVSHMEM::host)
    add_library(NVSHMEM::host SHARED IMPORTED)
    set_target_properties(NVSHMEM::host PROPERTIES
      IMPORTED_LOCATION "${NVSHMEM_HOST_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${NVSHMEM_INCLUDE_DIR}")
    add_library(NVSHMEM::device STATIC IMPORTED)
    set_target_properties(NVSHMEM::device PROPERTIES
      IMPORTED_LOCATION "${NVSHMEM_DEVICE_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${NVSHMEM_INCLUDE_DIR}")
  endif()
endif()
