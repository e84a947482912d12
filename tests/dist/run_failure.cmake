# Runs COMMAND (a list) and passes only if it exits nonzero within MAX_SECONDS and its
# output matches EXPECT: a job with a dead or stuck rank must end, and say why.
execute_process(COMMAND ${COMMAND} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err
                TIMEOUT ${MAX_SECONDS})
message("exit: ${rc}\n--- stdout ---\n${out}\n--- stderr ---\n${err}")
if(rc MATCHES "^0$")
  message(FATAL_ERROR "expected a nonzero exit")
endif()
if(NOT rc MATCHES "^[0-9]+$")  # execute_process's own timeout: "Process terminated due to timeout"
  message(FATAL_ERROR "the job did not end within ${MAX_SECONDS} s: ${rc}")
endif()
if(NOT "${out}${err}" MATCHES "${EXPECT}")
  message(FATAL_ERROR "the output does not mention '${EXPECT}'")
endif()
