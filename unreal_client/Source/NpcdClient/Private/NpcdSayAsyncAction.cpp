#include "NpcdSayAsyncAction.h"

#include "Engine/Engine.h"
#include "Engine/GameInstance.h"
#include "Engine/World.h"

UNpcdSayAsyncAction* UNpcdSayAsyncAction::SayLine(UObject* WorldContextObject, const FString& Persona,
                                                  const FString& Speaker, const FString& Line, const FString& NpcId,
                                                  int32 MaxTokens, bool Structured, const FString& ResponseFormat,
                                                  ENpcdSegmentation Segmentation, const FString& Conversation,
                                                  const FNpcdLineOptions& Options)
{
    UNpcdSayAsyncAction* Action = Make(WorldContextObject, Persona, Speaker, Line, NpcId, MaxTokens, Segmentation,
                                       Conversation, Options);
    Action->bStructured = Structured;
    Action->ResponseFormat = ResponseFormat;
    return Action;
}

UNpcdSayAsyncAction* UNpcdSayAsyncAction::SayLineWithActions(UObject* WorldContextObject, const FString& Persona,
                                                             const FString& Speaker, const FString& Line,
                                                             const FString& NpcId,
                                                             const TArray<FNpcdActionSpec>& Actions, int32 MaxTokens,
                                                             ENpcdSegmentation Segmentation, const FString& Conversation,
                                                  const FNpcdLineOptions& Options)
{
    UNpcdSayAsyncAction* Action = Make(WorldContextObject, Persona, Speaker, Line, NpcId, MaxTokens, Segmentation,
                                       Conversation, Options);
    Action->bStructured = true;
    Action->Actions = Actions;
    return Action;
}

UNpcdSayAsyncAction* UNpcdSayAsyncAction::Make(UObject* WorldContextObject, const FString& Persona,
                                               const FString& Speaker, const FString& Line, const FString& NpcId,
                                               int32 MaxTokens, ENpcdSegmentation Segmentation,
                                               const FString& Conversation, const FNpcdLineOptions& Options)
{
    UNpcdSayAsyncAction* Action = NewObject<UNpcdSayAsyncAction>();
    UWorld* World = GEngine->GetWorldFromContextObject(WorldContextObject, EGetWorldErrorMode::LogAndReturnNull);
    if (World != nullptr && World->GetGameInstance() != nullptr)
    {
        Action->Subsystem = World->GetGameInstance()->GetSubsystem<UNpcdSubsystem>();
        Action->RegisterWithGameInstance(World->GetGameInstance());
    }
    Action->Persona = Persona;
    Action->Speaker = Speaker;
    Action->Line = Line;
    Action->NpcId = NpcId;
    Action->MaxTokens = MaxTokens;
    Action->Segmentation = Segmentation;
    Action->Conversation = Conversation;
    Action->Options = Options;
    return Action;
}

bool UNpcdSayAsyncAction::ApplyOptions(npcd_request* Request) const
{
    bool bOk = true;
    for (const FNpcdTurn& Turn : Options.History)
        bOk &= npcd_request_add_history(Request, TCHAR_TO_UTF8(*Turn.Speaker), TCHAR_TO_UTF8(*Turn.Text)) == NPCD_OK;
    for (const TPair<FString, FString>& Fact : Options.Context)
        bOk &= npcd_request_set_context(Request, TCHAR_TO_UTF8(*Fact.Key), TCHAR_TO_UTF8(*Fact.Value)) == NPCD_OK;
    if (Options.DeadlineMs > 0) bOk &= npcd_request_set_deadline_ms(Request, static_cast<uint32_t>(Options.DeadlineMs)) == NPCD_OK;
    if (Options.Temperature >= 0.0f) bOk &= npcd_request_set_temperature(Request, Options.Temperature) == NPCD_OK;
    if (Options.TopP >= 0.0f) bOk &= npcd_request_set_top_p(Request, Options.TopP) == NPCD_OK;
    if (Options.bUseSeed) bOk &= npcd_request_set_seed(Request, static_cast<uint64_t>(Options.Seed)) == NPCD_OK;
    npcd_request_set_priority(Request, Options.bAmbient ? NPCD_PRIORITY_AMBIENT : NPCD_PRIORITY_PLAYER);
    return bOk;
}

void UNpcdSayAsyncAction::Activate()
{
    npcd_request* Request = npcd_request_new(TCHAR_TO_UTF8(*Persona), TCHAR_TO_UTF8(*Line));
    if (Request != nullptr)
    {
        // A refused field (NPCD_ERR_INVALID_UTF8 / _INVALID_ARGUMENT) fails the line instead of silently
        // leaving the field out.
        bool bActionsOk = npcd_request_set_speaker(Request, TCHAR_TO_UTF8(*Speaker)) == NPCD_OK &&
                          npcd_request_set_npc_id(Request, TCHAR_TO_UTF8(*NpcId)) == NPCD_OK;
        bActionsOk &= ApplyOptions(Request);
        if (MaxTokens > 0) npcd_request_set_max_tokens(Request, static_cast<uint32_t>(MaxTokens));
        if (bStructured) npcd_request_set_structured(Request, 1);
        bActionsOk &= npcd_request_set_segmentation(Request, static_cast<int32_t>(Segmentation)) == NPCD_OK &&
                      npcd_request_set_conversation(Request, TCHAR_TO_UTF8(*Conversation)) == NPCD_OK;
        if (!ResponseFormat.IsEmpty())
            bActionsOk &= npcd_request_set_response_format(Request, TCHAR_TO_UTF8(*ResponseFormat)) == NPCD_OK;
        for (const FNpcdActionSpec& Spec : Actions)
        {
            bActionsOk &= npcd_request_add_action(Request, TCHAR_TO_UTF8(*Spec.Name), TCHAR_TO_UTF8(*Spec.Description),
                                                  TCHAR_TO_UTF8(*Spec.ArgsSchemaJson)) == NPCD_OK;
        }
        if (bActionsOk && Subsystem.IsValid()) RequestId = Subsystem->Submit(Request, this);
        npcd_request_free(Request);
    }
    if (RequestId.IsEmpty())
    {
        OnFailed.Broadcast(RequestId, 3, TEXT("the request was refused (no subsystem or connection, or an invalid persona, line, "
                                              "speaker, npc id, conversation, response format, action, history turn, context entry or "
                                              "sampling option; text must be "
                                              "valid UTF-16)"), 0);
        SetReadyToDestroy();
    }
}

void UNpcdSayAsyncAction::Cancel()
{
    if (Subsystem.IsValid() && !RequestId.IsEmpty()) Subsystem->Cancel(RequestId);
}

void UNpcdSayAsyncAction::SetReadyToDestroy()
{
    if (Subsystem.IsValid() && !RequestId.IsEmpty()) Subsystem->Forget(RequestId);
    Super::SetReadyToDestroy();
}

void UNpcdSayAsyncAction::OnNpcdEvent(const npcd_event& Event)
{
    switch (Event.kind)
    {
    case NPCD_EVENT_TEXT_DELTA:
    {
        const FString Text = UTF8_TO_TCHAR(Event.text);
        FullText += Text;
        OnTextDelta.Broadcast(RequestId, Text, FullText);
        break;
    }
    case NPCD_EVENT_ACTION:
        OnAction.Broadcast(RequestId, UTF8_TO_TCHAR(Event.action_name), UTF8_TO_TCHAR(Event.action_args_json));
        break;
    case NPCD_EVENT_EMOTION:
        OnEmotion.Broadcast(RequestId, UTF8_TO_TCHAR(Event.emotion));
        break;
    case NPCD_EVENT_SENTENCE:
        OnSentence.Broadcast(RequestId, static_cast<int32>(Event.sentence_index), UTF8_TO_TCHAR(Event.text));
        break;
    case NPCD_EVENT_FINISHED:
        OnFinished.Broadcast(RequestId, UTF8_TO_TCHAR(Event.text), Event.finish_reason, UTF8_TO_TCHAR(Event.json));
        SetReadyToDestroy();
        break;
    case NPCD_EVENT_ERROR:
        OnFailed.Broadcast(RequestId, Event.error_code, UTF8_TO_TCHAR(Event.text), static_cast<int32>(Event.retry_after_ms));
        SetReadyToDestroy();
        break;
    default:
        break;
    }
}
